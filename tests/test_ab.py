"""The in-process A/B benchmark: variants take turns, and both comparisons run the notebooks' code."""

from __future__ import annotations

import json

import pytest

from benchmarks import ab, benchmark


def test_alternate_flips_order_every_block():
    calls = []
    variants = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = ab.alternate(variants, blocks=3, steps=2, warmup=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert {name: len(samples) for name, samples in times.items()} == {"a": 6, "b": 6}


def test_summarise_gives_ratio_to_first_variant():
    rows = ab.summarise("SETTING", "case", {"on": [0.2, 0.3, 0.4], "off": [0.1, 0.15, 0.2]})
    assert [row["variant"] for row in rows] == ["on", "off"]
    assert rows[0]["ratio_to_first"] == 1.0
    assert rows[1]["ratio_to_first"] == pytest.approx(0.5)
    assert rows[1]["median_ms"] == pytest.approx(150.0)
    assert (rows[1]["min_ms"], rows[1]["max_ms"]) == pytest.approx((100.0, 200.0))


def test_main_runs_every_comparison(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(benchmark.LSTM_SIZES, "cpu", {"embed": 6, "hidden": 8, "batch": 4, "window": 5})
    monkeypatch.setattr(ab, "VOCAB_SIZE", 50)
    output = tmp_path / "ab.json"
    assert ab.main(["--blocks", "2", "--steps", "1", "--warmup", "0", "--output", str(output)]) == 0
    rows = json.loads(output.read_text())["rows"]
    cases = [(row["comparison"], row["case"], row["variant"]) for row in rows]
    language_models = [(setting, model, variant) for setting in ("ONEDNN_MATMUL", "MIXED_PRECISION")
                       for model in ("MyLSTM", "MyLSTM_att", "TorchLSTM") for variant in ("on", "off")]
    assert cases == language_models + [("CHANNELS_LAST", "CycleGAN iteration", "channels-last"),
                                       ("CHANNELS_LAST", "CycleGAN iteration", "default")]
    assert all(row["steps"] == 2 for row in rows)
    assert all(row["median_ms"] > 0 for row in rows)
    assert "| ONEDNN_MATMUL | MyLSTM | off |" in capsys.readouterr().out


def test_invalid_counts_rejected(capsys):
    with pytest.raises(SystemExit):
        ab.main(["--blocks", "0"])
    assert "--blocks and --steps must be at least 1" in capsys.readouterr().err


def test_unknown_setting_rejected():
    with pytest.raises(ValueError, match="unknown part 1 setting 'NOT_A_SETTING'"):
        next(ab.setting_comparisons("NOT_A_SETTING", blocks=1, steps=1, warmup=0))


def test_summarise_takes_median_not_mean():
    rows = ab.summarise("SETTING", "case", {"on": [0.1, 0.2, 0.9], "off": [0.1, 0.1, 0.4]})
    assert rows[0]["median_ms"] == pytest.approx(200.0)      # the mean is 400
    assert rows[1]["median_ms"] == pytest.approx(100.0)
    assert rows[1]["ratio_to_first"] == pytest.approx(0.5)
