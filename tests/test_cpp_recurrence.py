"""The C++ kernel experiment: LSTMRecurrence's values and gradients, and every variant in its results file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from benchmarks import benchmark, cpp_recurrence
from tools.nbdefs import load_definitions

COMPILER = os.environ.get("CXX", "c++")
TOOLS_MISSING = shutil.which(COMPILER) is None or not cpp_extension.is_ninja_available()
SKIP_REASON = f"building the C++ kernel needs the compiler {COMPILER!r} and ninja"
needs_build = pytest.mark.skipif(TOOLS_MISSING, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def part1():
    return load_definitions(cpp_recurrence.REPO_ROOT / "part1_lstm.ipynb", env={"PROFILE": "smoke"})


@pytest.fixture(scope="module")
def kernel():
    if TOOLS_MISSING:
        pytest.skip(SKIP_REASON)
    module, _ = cpp_recurrence.build_kernel()
    return module


@pytest.fixture()
def recurrence(part1, kernel):
    return cpp_recurrence.make_recurrence(part1, kernel)


@needs_build
def test_kernel_matches_notebook_recurrence(part1, recurrence):
    assert cpp_recurrence.check_against_notebook(part1, part1.LSTMRecurrence, recurrence) <= 1e-5


@needs_build
def test_saturated_gates_match_too(part1, recurrence):
    """Inputs 50 times larger saturate the gates, and exp overflows float32 inside the kernel."""
    assert cpp_recurrence.check_against_notebook(part1, part1.LSTMRecurrence, recurrence, scale=50.0) <= 1e-5


@needs_build
def test_addmm_path_matches_too(part1, recurrence, monkeypatch):
    """With ONEDNN_MATMUL off, prepack returns W_hh as it is and the kernel multiplies with addmm."""
    monkeypatch.setattr(part1, "ONEDNN_MATMUL", False)
    assert not part1.prepack(torch.randn(8, 2), 4).is_mkldnn
    assert cpp_recurrence.check_against_notebook(part1, part1.LSTMRecurrence, recurrence) <= 1e-5


@needs_build
def test_kernel_matches_plain_cell_loop(part1, recurrence):
    """Against MyLSTMCell stepped in Python, the assignment's own form, not only LSTMRecurrence."""
    torch.manual_seed(2)
    cell = part1.MyLSTMCell(6, 5)
    inputs = torch.randn(3, 7, 6)
    zeros = torch.zeros(3, 5)
    hs, _, _ = recurrence.apply(inputs.transpose(0, 1), zeros, zeros, cell.x2h.weight, cell.x2h.bias,
                                cell.h2h.weight, cell.h2h.bias)
    expected = part1.run_cell_over_window(cell, inputs, fused=False)
    torch.testing.assert_close(hs.transpose(0, 1), expected, rtol=1e-5, atol=1e-6)


def scale_outputs(outputs):
    return tuple(1.01 * output for output in outputs)


def scale_gradients(outputs):
    return tuple(output + 0.5 * (output - output.detach()) for output in outputs)   # same values, 1.5x gradient


@needs_build
@pytest.mark.parametrize("distort, part", [(scale_outputs, "hidden states"), (scale_gradients, "input gradient")])
def test_wrong_kernel_rejected(part1, recurrence, distort, part):
    class Distorted:
        @staticmethod
        def apply(*args):
            return distort(recurrence.apply(*args))

    with pytest.raises(RuntimeError, match=f"differs from LSTMRecurrence in its {part}"):
        cpp_recurrence.check_against_notebook(part1, part1.LSTMRecurrence, Distorted)


@needs_build
def test_double_gates_named(kernel):
    gates = torch.zeros(2, 3, 16, dtype=torch.float64)
    state = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="gates must be a contiguous float32 CPU tensor, got Double"):
        kernel.forward(gates, torch.zeros(16, 4), state, state, None)


@needs_build
def test_steps_switch_recurrence_each_call(part1, recurrence, monkeypatch):
    """Each step sets the recurrence it was built with, whichever step ran before it."""
    # The steps replace LSTMRecurrence in the shared `part1`, so it is put back after the test.
    monkeypatch.setattr(part1, "LSTMRecurrence", part1.LSTMRecurrence)
    used = []

    def recording(name, function):
        class Recording:
            @staticmethod
            def apply(*args):
                used.append(name)
                return function.apply(*args)
        return Recording

    size = {"embed": 6, "hidden": 8, "batch": 2, "window": 3}
    steps = cpp_recurrence.step_variants(part1, recording("notebook", part1.LSTMRecurrence),
                                         recording("C++", recurrence), size, "training")
    for name in ("MyLSTM, C++ kernel", "MyLSTM", "MyLSTM_att, C++ kernel", "MyLSTM_att", "TorchLSTM"):
        steps[name]()
    assert used == ["C++", "notebook", "C++", "notebook"]


@needs_build
def test_main_writes_every_variant(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(benchmark.LSTM_SIZES, "cpu", {"embed": 6, "hidden": 8, "batch": 4, "window": 5})
    monkeypatch.setattr(cpp_recurrence, "VOCAB_SIZE", 50)
    monkeypatch.setattr(cpp_recurrence, "BATCH", 4)
    output = tmp_path / "cpp-kernel.json"
    assert cpp_recurrence.main(["--sizes", "cpu", "--rounds", "2", "--blocks", "2", "--steps", "1",
                                "--warmup", "0", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    windows = [(row["size"], row["variant"]) for row in results["windows"]]
    assert windows == [("cpu", "torch.nn.LSTM"), ("cpu", "LSTMRecurrence"), ("cpu", "C++ kernel")]
    steps = [(row["path"], row["variant"]) for row in results["training_steps"]]
    variants = ["TorchLSTM", "MyLSTM", "MyLSTM, C++ kernel", "MyLSTM_att", "MyLSTM_att, C++ kernel"]
    assert steps == [(path, variant) for path in ("training", "forward") for variant in variants]
    assert all(row["samples"] == 2 for row in results["training_steps"])
    assert all(0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"] for row in results["windows"])
    assert results["windows"][0]["ratio_to_torch"] == 1.0
    assert results["largest_difference"] <= 1e-5
    assert "| cpu, forward | MyLSTM, C++ kernel |" in capsys.readouterr().out


@needs_build
def test_repeated_size_timed_once(tmp_path, monkeypatch):
    monkeypatch.setitem(benchmark.LSTM_SIZES, "cpu", {"embed": 6, "hidden": 8, "batch": 4, "window": 5})
    monkeypatch.setattr(cpp_recurrence, "VOCAB_SIZE", 50)
    monkeypatch.setattr(cpp_recurrence, "BATCH", 4)
    output = tmp_path / "cpp-kernel.json"
    assert cpp_recurrence.main(["--sizes", "cpu", "cpu", "--rounds", "1", "--blocks", "1", "--steps", "1",
                                "--warmup", "0", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert len(results["windows"]) == 3
    assert len(results["training_steps"]) == 10


def test_failed_build_ends_run_cleanly(tmp_path, monkeypatch, capsys):
    def fail():
        raise RuntimeError("building lstm_window.cpp failed (a test's failure)")

    monkeypatch.setattr(cpp_recurrence, "build_kernel", fail)
    output = tmp_path / "cpp-kernel.json"
    with pytest.raises(SystemExit) as exit_info:
        cpp_recurrence.main(["--output", str(output)])
    assert exit_info.value.code == 1
    assert "error: building lstm_window.cpp failed (a test's failure)" in capsys.readouterr().err
    assert not output.exists()


def test_mismatched_kernel_ends_run_cleanly(tmp_path, monkeypatch, capsys):
    def mismatch(*args):
        raise RuntimeError("the C++ kernel differs from LSTMRecurrence in its hidden states (a test's failure)")

    monkeypatch.setattr(cpp_recurrence, "build_kernel", lambda: (object(), 0.0))
    monkeypatch.setattr(cpp_recurrence, "check_against_notebook", mismatch)
    output = tmp_path / "cpp-kernel.json"
    with pytest.raises(SystemExit) as exit_info:
        cpp_recurrence.main(["--output", str(output)])
    assert exit_info.value.code == 1
    assert "error: the C++ kernel differs from LSTMRecurrence" in capsys.readouterr().err
    assert not output.exists()


def test_invalid_counts_rejected(capsys):
    with pytest.raises(SystemExit):
        cpp_recurrence.main(["--blocks", "0"])
    assert "--rounds, --blocks and --steps must be at least 1" in capsys.readouterr().err


def test_missing_tools_named(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"needs the C\+\+ compiler 'no-such-compiler' \(\$CXX, or c\+\+\) "
                                           r"and ninja; install them"):
        cpp_recurrence.build_kernel()


def test_unwritable_build_folder_named(tmp_path, monkeypatch):
    """A file in place of the build folder's parent, because permissions do not stop tests run as root."""
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    with pytest.raises(RuntimeError, match=r"cannot create the kernel's build folder .*cache.*; set "
                                           r"TORCH_EXTENSIONS_DIR to a folder that can be written"):
        cpp_recurrence.build_kernel()


def test_read_only_build_folder_named(tmp_path, monkeypatch):
    """An existing build folder that os.access reports as read-only, since tests run as root, stops the build."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    folder = cpp_recurrence.build_folder()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode) and Path(path) != folder)
    with pytest.raises(RuntimeError, match=r"the kernel's build folder .*cache.* is not writable; set "
                                           r"TORCH_EXTENSIONS_DIR to a folder that can be written"):
        cpp_recurrence.build_kernel()


@needs_build
def test_failed_build_named(tmp_path, monkeypatch):
    """A compiler that fails at once, in a fresh build folder, so that no cached build is loaded."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match=r"building .*lstm_window.cpp in .* failed .*Check that 'false' runs and "
                                           r"compiles.*unset it to use c\+\+"):
        cpp_recurrence.build_kernel()


def forward_arguments(steps=2, batch=3, hidden=4):
    """Valid arguments of the kernel's forward(): gates, weight_hh, h0, c0 and no packed weight."""
    return [torch.zeros(steps, batch, 4 * hidden), torch.zeros(4 * hidden, hidden), torch.zeros(batch, hidden),
            torch.zeros(batch, hidden), None]


@needs_build
@pytest.mark.parametrize("index, value, message", [
    (2, torch.zeros(5, 4), r"h0 must have shape \[3, 4\], got \[5, 4\]"),
    (3, torch.zeros(3, 5), r"c0 must have shape \[3, 4\], got \[3, 5\]"),
    (1, torch.zeros(12, 4), r"weight_hh must have shape \[16, 4\], got \[12, 4\]"),
    (0, torch.zeros(2, 3, 12), r"gates must have shape \[2, 3, 16\], got \[2, 3, 12\]"),
    (0, torch.zeros(0, 3, 16), r"at least one time step, batch row and hidden unit, got gates \[0, 3, 16\]"),
    (0, torch.zeros(3, 16), r"gates must be \(T, B, 4H\) and weight_hh \(4H, H\), got \[3, 16\]"),
    (4, torch.zeros(12, 4), r"packed \(weight_hh in oneDNN's layout\) must have shape \[16, 4\], got \[12, 4\]"),
])
def test_forward_shape_mismatch_named(kernel, index, value, message):
    arguments = forward_arguments()
    arguments[index] = value
    with pytest.raises(RuntimeError, match=message):
        kernel.forward(*arguments)


@needs_build
@pytest.mark.parametrize("index, value, message", [
    (1, torch.zeros(2, 3, 4), r"cells must have shape \[3, 3, 4\], got \[2, 3, 4\]"),
    (2, torch.zeros(3, 3, 4), r"tanh_cells must have shape \[2, 3, 4\], got \[3, 3, 4\]"),
    (4, torch.zeros(1, 3, 4), r"grad_hs must have shape \[2, 3, 4\], got \[1, 3, 4\]"),
    (5, torch.zeros(3, 5), r"grad_h_last must have shape \[3, 4\], got \[3, 5\]"),
    (6, torch.zeros(4), r"grad_c_last must have shape \[3, 4\], got \[4\]"),
])
def test_backward_shape_mismatch_named(kernel, index, value, message):
    gates, weight_hh, h0, c0, _ = forward_arguments()
    hs, cells, tanh_cells = kernel.forward(gates, weight_hh, h0, c0, None)
    arguments = [gates, cells, tanh_cells, weight_hh, torch.zeros(2, 3, 4), h0, c0, False]
    arguments[index] = value
    with pytest.raises(RuntimeError, match=message):
        kernel.backward(*arguments)


class ScaledValues:
    """LSTMRecurrence with its outputs' values multiplied by 1 + `error` and their gradients left exact."""

    def __init__(self, notebook, error):
        self.notebook, self.error = notebook, error

    def apply(self, *args):
        return tuple(output + self.error * output.detach() for output in self.notebook.apply(*args))


def test_largest_difference_is_returned(part1):
    """The check returns the largest relative difference over all outputs and gradients, not the last one."""
    worst = cpp_recurrence.check_against_notebook(part1, part1.LSTMRecurrence,
                                                  ScaledValues(part1.LSTMRecurrence, 5e-6))
    assert worst == pytest.approx(5e-6, rel=0.05)


def test_difference_over_limit_rejected(part1):
    """Outputs 2e-5 off relative to their largest entry exceed the limit of 1e-5 and are rejected."""
    with pytest.raises(RuntimeError, match="differs from LSTMRecurrence in its hidden states by up to 2e-05"):
        cpp_recurrence.check_against_notebook(part1, part1.LSTMRecurrence, ScaledValues(part1.LSTMRecurrence, 2e-5))


def test_nan_outputs_rejected(part1):
    """A kernel that returns NaN fails the check instead of passing every comparison with NaN."""
    with pytest.raises(RuntimeError, match="differs from LSTMRecurrence in its hidden states by up to nan"):
        cpp_recurrence.check_against_notebook(part1, part1.LSTMRecurrence,
                                              ScaledValues(part1.LSTMRecurrence, float("nan")))


def test_rows_give_ratio_to_first():
    """Each row's ratio is its median over the first variant's median, and the times are in milliseconds."""
    rows = cpp_recurrence.rows_of({"torch.nn.LSTM": [0.002, 0.001, 0.003], "C++ kernel": [0.004, 0.006, 0.005]},
                                  size="cpu")
    assert [row["variant"] for row in rows] == ["torch.nn.LSTM", "C++ kernel"]
    assert rows[0]["ratio_to_torch"] == 1.0
    assert rows[1]["ratio_to_torch"] == pytest.approx(2.5)
    assert rows[1]["median_ms"] == pytest.approx(5.0)
    assert rows[1]["min_ms"] == pytest.approx(4.0)
    assert rows[1]["max_ms"] == pytest.approx(6.0)
    assert rows[1]["samples"] == 3
    assert rows[1]["size"] == "cpu"


def test_negative_warmup_rejected(tmp_path, monkeypatch, capsys):
    """A warm-up count below 0 stops the run before any kernel is built."""
    def fail():
        raise RuntimeError("the kernel was built (a test's failure)")

    monkeypatch.setattr(cpp_recurrence, "build_kernel", fail)
    with pytest.raises(SystemExit):
        cpp_recurrence.main(["--warmup", "-1", "--output", str(tmp_path / "cpp-kernel.json")])
    assert "--warmup at least 0, got 40, 8, 3 and -1" in capsys.readouterr().err
