"""The recurrence breakdown script: every variant runs the notebook's code and is written to the results file."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from benchmarks import recurrence
from tools.nbdefs import load_definitions

# torch.compile's CPU backend (inductor, PyTorch 2.14 on Linux) builds C++ kernels with $CXX, or g++.
CXX = os.environ.get("CXX", "g++")
needs_cxx = pytest.mark.skipif(shutil.which(CXX) is None,
                               reason=f"torch.compile's CPU backend needs the C++ compiler {CXX!r}: "
                                      f"install g++ or set CXX")

VARIANTS = ("torch.nn.LSTM forward+backward", "MyLSTM recurrence forward+backward",
            "LSTMRecurrence forward, x2h included", "35 products, W_hh packed", "35 products, W_hh not packed",
            "x2h product over the window", "backward: 35 products dz_t W_hh",
            "backward: 35 products dz_t W_hh, W_hh^T packed", "backward: 3 products over the window",
            "35 times tanh of (64, H)", "35 times sigmoid of (64, 4H)", "Adam step, fused",
            "Adam step, per-tensor loop")
MKL_VARIANT = "35 products through MKL's packed multiply"


def test_breakdown_writes_every_variant(tmp_path, part1):
    output = tmp_path / "recurrence.json"
    assert recurrence.main(["--hidden", "8", "--rounds", "2", "--warmup", "1", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    variants = {row["variant"]: row for row in results["rows"]}
    expected = {*VARIANTS, MKL_VARIANT} if recurrence.MKL_LINEAR_OP is not None else set(VARIANTS)
    if not part1.prepack(torch.ones(8, 8), 64).is_mkldnn:       # oneDNN off ("auto" without AVX-512)
        expected -= {"35 products, W_hh packed", "backward: 35 products dz_t W_hh, W_hh^T packed"}
    assert set(variants) == expected
    assert {row["hidden"] for row in results["rows"]} == {8}
    for name, row in variants.items():
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"], name
    assert results["rounds"] == 2


@pytest.fixture(scope="module")
def part1():
    return load_definitions(recurrence.REPO_ROOT / "part1_lstm.ipynb", env={"PROFILE": "smoke"})


@pytest.mark.skipif(recurrence.MKL_LINEAR_OP is None, reason="this PyTorch build has no MKL")
def test_mkl_product_matches_addmm():
    torch.manual_seed(0)
    x, weight, add = torch.randn(6, 5), torch.randn(12, 5), torch.randn(6, 12)
    packed = recurrence.MKL_PACK_OP(weight, 6)
    torch.testing.assert_close(recurrence.mkl_linear(x, packed, weight, add), torch.addmm(add, x, weight.t()))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_packed_backward_product_matches(part1, monkeypatch):
    """The backward variant with W_hh^T packed computes dz W_hh + dh, as the unpacked one does."""
    monkeypatch.setattr(part1, "ONEDNN_MATMUL", True)      # packed on every host, not only where "auto" picks it
    torch.manual_seed(0)
    grad_gates, weight, grad_h = torch.randn(6, 12), torch.randn(12, 3), torch.randn(6, 3)
    packed = part1.prepack(weight.t().contiguous(), 6)
    assert packed.is_mkldnn
    torch.testing.assert_close(part1.linear(grad_gates, packed, add=grad_h), torch.addmm(grad_h, grad_gates, weight))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("onednn", [True, False])
def test_packed_rows_only_where_packed(part1, monkeypatch, onednn):
    """A "packed" row is timed only where prepack packs; with oneDNN off it would time unpacked products."""
    monkeypatch.setattr(part1, "ONEDNN_MATMUL", onednn)
    names = set(recurrence.variants_for(part1, 8)[0])
    packed_rows = {"35 products, W_hh packed", "backward: 35 products dz_t W_hh, W_hh^T packed"}
    assert (packed_rows <= names) == onednn
    assert bool(packed_rows & names) == onednn


@needs_cxx
def test_compiled_recurrence_is_checked_and_timed(tmp_path):
    output = tmp_path / "recurrence.json"
    assert recurrence.main(["--hidden", "8", "--rounds", "2", "--warmup", "1", "--compile",
                            "--output", str(output)]) == 0
    rows = {row["variant"]: row for row in json.loads(output.read_text())["rows"]}
    compiled = rows["plain recurrence compiled by torch.compile, forward+backward"]
    assert compiled["first_call_s"] > 0
    assert 0 < compiled["min_ms"] <= compiled["median_ms"] <= compiled["max_ms"]


def test_plain_window_matches_the_notebook_recurrence(part1):
    """The compiled variant's math, run eagerly: the same hidden states as the plain loop and LSTMRecurrence."""
    torch.manual_seed(1)
    cell = part1.MyLSTMCell(6, 5)
    inputs = torch.randn(3, 7, 6)
    zeros = torch.zeros(3, 5)
    hs = recurrence.plain_window(inputs.transpose(0, 1), zeros, zeros, cell.x2h.weight,
                                 cell.x2h.bias + cell.h2h.bias, cell.h2h.weight).transpose(0, 1)
    expected = part1.run_cell_over_window(cell, inputs, fused=False)
    torch.testing.assert_close(hs, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs, part1.run_cell_over_window(cell, inputs, fused=True), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(hs, part1.run_cell_over_window(cell, inputs.flip(1), fused=False))


def scale_outputs(hs):
    return 1.01 * hs


def scale_gradients(hs):
    return hs + 0.5 * (hs - hs.detach())     # the same values, 1.5 times the gradient


@pytest.mark.parametrize("distort, part", [(scale_outputs, "hidden states"),
                                           (scale_gradients, "input gradient")])
@needs_cxx
def test_compiled_recurrence_mismatch_rejected(part1, monkeypatch, distort, part):
    plain = recurrence.plain_window
    monkeypatch.setattr(recurrence, "plain_window", lambda *args: distort(plain(*args)))
    cell = part1.MyLSTMCell(4, 4)
    inputs = torch.randn(2, 3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match=f"differs from LSTMRecurrence in its {part}"):
        recurrence.compiled_variant(part1, cell, inputs, torch.randn(2, 3, 4))


def test_measure_times_rounds_after_warmup():
    calls = []
    times = recurrence.measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert {name: len(samples) for name, samples in times.items()} == {"a": 3, "b": 3}


def test_breakdown_rows_summarise_samples(tmp_path, monkeypatch, capsys):
    """Known samples for every variant: each row gives their median and range, and the table gives the time per step."""
    monkeypatch.setattr(recurrence, "measure",
                        lambda variants, rounds, warmup: {name: [0.0035, 0.007, 0.035] for name in variants})
    output = tmp_path / "recurrence.json"
    assert recurrence.main(["--hidden", "8", "--output", str(output)]) == 0
    rows = {row["variant"]: row for row in json.loads(output.read_text())["rows"]}
    row = rows["torch.nn.LSTM forward+backward"]
    assert row["median_ms"] == pytest.approx(7.0)             # the mean is 15.2
    assert row["min_ms"] == pytest.approx(3.5)
    assert row["max_ms"] == pytest.approx(35.0)
    # 7 ms over 35 time steps is 200 µs per step.
    assert "| 8 | torch.nn.LSTM forward+backward | 7.00 | 3.50-35.00 | 200 |" in capsys.readouterr().out
