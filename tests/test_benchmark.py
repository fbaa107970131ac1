"""The benchmark script: its cases run the notebooks' code, count the arithmetic and pool rounds."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import pytest
import torch

from benchmarks import benchmark

SMALL = {"embed": 6, "hidden": 8, "batch": 4, "window": 5}
VOCAB = 50


@pytest.fixture
def small_sizes(monkeypatch):
    monkeypatch.setitem(benchmark.LSTM_SIZES, "cpu", SMALL)
    monkeypatch.setattr(benchmark, "VOCAB_SIZE", VOCAB)


def expected_training_flops(size, vocab):
    """Matrix-multiply FLOPs of one MyLSTM training step: x2h, h2h and the output layer at every position.

    Each product costs 2*m*k*n forward and twice that backward (input and weight gradients).
    """
    rows = size["batch"] * size["window"]
    four_hidden = 4 * size["hidden"]
    forward = 2 * rows * (size["embed"] * four_hidden + size["hidden"] * four_hidden + size["hidden"] * vocab)
    return 3 * forward


@pytest.mark.parametrize("case", ["lstm:MyLSTM:fused:cpu:training", "lstm:TorchLSTM:fused:cpu:training"])
def test_case_counts_all_matmul_flops(small_sizes, case):
    """FLOPs come from the plain loop without oneDNN, which FlopCounterMode can see in full."""
    result = benchmark.run_case(case, repeats=2, warmup=1)
    expected = expected_training_flops(SMALL, VOCAB)
    # The first step's h2h product multiplies h_0 = 0 and its backward through h_0 is skipped, so
    # the count is a little below the closed form.
    assert 0.9 * expected <= result["flops"] <= expected, (result["flops"], expected)
    assert len(result["times_s"]) == 2
    assert all(seconds > 0 for seconds in result["times_s"])


def test_case_count_is_the_plain_loops(small_sizes):
    """The plain loop multiplies h_0 = 0 by W_hh but needs no gradient for h_0, so that backward product is missing."""
    result = benchmark.run_case("lstm:MyLSTM:fused:cpu:training", repeats=1, warmup=0)
    skipped = 2 * SMALL["batch"] * SMALL["hidden"] * 4 * SMALL["hidden"]
    assert result["flops"] == expected_training_flops(SMALL, VOCAB) - skipped


def test_modes_share_the_loop_count(small_sizes):
    """FLOPs of every mode, and of TorchLSTM, are counted on MyLSTM run as the plain loop."""
    loop = benchmark.run_case("lstm:MyLSTM:loop:cpu:training", repeats=1, warmup=0)["flops"]
    cases = ("lstm:MyLSTM:fused:cpu:training", "lstm:MyLSTM:naive:cpu:training", "lstm:TorchLSTM:fused:cpu:training")
    for case in cases:
        assert benchmark.run_case(case, repeats=1, warmup=0)["flops"] == loop, case


def default_settings():
    """Return the notebook's default speed settings, all on except two that need CPU instructions."""
    cpu_dependent = {"ONEDNN_MATMUL": torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
                     "MIXED_PRECISION": benchmark.cpu_has_bfloat16() and not torch.cuda.is_available()}
    return {name: cpu_dependent.get(name, True) for name in benchmark.SPEED_SETTINGS}


def test_case_runs_with_default_speed_settings(small_sizes):
    result = benchmark.run_case("lstm:MyLSTM:fused:cpu:forward", repeats=1, warmup=0)
    assert result["settings"] == default_settings()


@pytest.mark.parametrize("ablation, forced", [
    ("-ONEDNN_MATMUL", {"ONEDNN_MATMUL": False}),
    ("+ONEDNN_MATMUL", {"ONEDNN_MATMUL": True}),
    ("-MIXED_PRECISION", {"MIXED_PRECISION": False}),
    ("+MIXED_PRECISION", {"MIXED_PRECISION": True}),
    ("-KEEP_FREED_MEMORY", {"KEEP_FREED_MEMORY": False}),
    ("-all", {name: False for name in benchmark.SPEED_SETTINGS}),
])
def test_ablation_case_forces_settings(small_sizes, ablation, forced):
    result = benchmark.run_case(f"lstm:MyLSTM:fused:cpu:training:{ablation}", repeats=1, warmup=0)
    expected = default_settings() | forced
    for name in benchmark.SPEED_SETTINGS:
        assert result["settings"][name] is expected[name], name


def test_all_cases_include_the_ablations():
    cases = benchmark.all_cases("lstm")
    for name in (*benchmark.SPEED_SETTINGS, "all"):
        assert f"lstm:MyLSTM:fused:cpu:training:-{name}" in cases
    assert "lstm:MyLSTM:fused:cpu:training:+ONEDNN_MATMUL" in cases
    assert "lstm:MyLSTM:fused:cpu:training:+MIXED_PRECISION" in cases
    assert "cyclegan:cpu" not in cases


def test_machine_record_names_commit():
    source = benchmark.describe_machine()["source"]
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]), source
    assert isinstance(source["uncommitted_changes"], bool)


def test_rounds_pool_times_and_keep_peak_memory():
    first = {"times_s": [1.0, 2.0], "peak_memory_mib": 900.0, "flops": 10}
    second = {"times_s": [3.0], "peak_memory_mib": 800.0, "flops": 10, "data_share": 0.01}
    pooled = benchmark.merge_rounds(benchmark.merge_rounds(None, first), second)
    assert pooled["times_s"] == [1.0, 2.0, 3.0]
    assert pooled["round_medians_s"] == [1.5, 3.0]
    assert pooled["peak_memory_mib"] == 900.0
    assert pooled["data_share"] == 0.01


def test_rounds_keep_later_larger_peak():
    first = {"times_s": [1.0], "peak_memory_mib": 800.0, "flops": 10}
    second = {"times_s": [1.0], "peak_memory_mib": 900.0, "flops": 10}
    pooled = benchmark.merge_rounds(benchmark.merge_rounds(None, first), second)
    assert pooled["peak_memory_mib"] == 900.0


def test_case_peak_memory_in_mib(small_sizes):
    """ru_maxrss is in KiB. With PyTorch loaded the process uses hundreds of MiB, but less than the machine has."""
    result = benchmark.run_case("lstm:MyLSTM:fused:cpu:forward", repeats=1, warmup=0)
    machine_mib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    assert result["peak_memory_mib"] > 100
    assert result["peak_memory_mib"] < machine_mib


def recording_timed(monkeypatch):
    """Wrap benchmark.timed so that it records the seconds of every call, and return that record."""
    recorded = []
    real_timed = benchmark.timed

    def timed(*args):
        times = real_timed(*args)
        recorded.append(times)
        return times

    monkeypatch.setattr(benchmark, "timed", timed)
    return recorded


def test_matmul_rate_from_best_call(monkeypatch):
    """A multiply of two n x n matrices is 2 n^3 FLOPs, over the fastest of the timed calls."""
    recorded = recording_timed(monkeypatch)
    rates = benchmark.matmul_rate(torch.device("cpu"), size=64, repeats=5)
    assert len(recorded) == len(rates)
    for (name, rate), times in zip(rates.items(), recorded):
        assert len(times) == 5, name
        assert rate == pytest.approx(2 * 64 ** 3 / min(times)), name


def test_bfloat16_rate_from_best_call(monkeypatch):
    recorded = recording_timed(monkeypatch)
    monkeypatch.setattr(benchmark, "cpu_has_bfloat16", lambda: True)
    rate = benchmark.bfloat16_matmul_rate(torch.device("cpu"), size=64, repeats=5)
    assert len(recorded) == 1
    assert rate == pytest.approx(2 * 64 ** 3 / min(recorded[0]))


def test_main_summarises_pooled_rounds(tmp_path, monkeypatch, capsys):
    """Two rounds of known step times: pooled median and range, FLOP rates and the share of the larger matmul rate."""
    rounds = [{"times_s": [0.1, 0.2, 0.9], "peak_memory_mib": 800.0, "data_share": 0.04, "data_ms": 3.0},
              {"times_s": [0.3, 0.4, 0.5], "peak_memory_mib": 900.0, "data_share": 0.05, "data_ms": 4.0}]
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command[command.index("--case") + 1])
        result = {"flops": 2e9, **rounds[(len(calls) - 1) // 2]}     # two cases per round
        return subprocess.CompletedProcess(command, 0, json.dumps(result) + "\n", "")

    monkeypatch.setattr(benchmark.subprocess, "run", fake_run)
    monkeypatch.setattr(benchmark, "matmul_rate", lambda device: {"torch.mm": 1e11, "oneDNN linear": 4e11})
    monkeypatch.setattr(benchmark, "bfloat16_matmul_rate", lambda device: None)
    monkeypatch.setattr(benchmark, "describe_machine",
                        lambda: {"cpu": "test", "torch_cpu_capability": "none", "cpu_cores": 2, "gpu": None})
    output = tmp_path / "results.json"
    assert benchmark.main(["--only", "cyclegan", "--rounds", "2", "--repeats", "3", "--output", str(output)]) == 0
    row = json.loads(output.read_text())["rows"][0]
    assert row["case"] == "cyclegan:cpu"
    assert row["median_ms"] == pytest.approx(350.0)          # of the six pooled steps, whose mean is 400
    assert row["min_ms"] == pytest.approx(100.0)
    assert row["max_ms"] == pytest.approx(900.0)
    assert row["round_medians_ms"] == pytest.approx([200.0, 400.0])
    assert row["gflop_per_step"] == pytest.approx(2.0)
    assert row["gflop_per_s"] == pytest.approx(2.0 / 0.35)
    assert row["share_of_matmul_rate"] == pytest.approx(2e9 / 0.35 / 4e11)
    assert row["peak_memory_mib"] == 900.0
    assert row["data_share"] == 0.05                          # the last round's
    assert "| cyclegan:cpu | 350.0 | 100.0-900.0 |  | 2.00 | 5.7 | 1.4% | 900 | 5.0% |" in capsys.readouterr().out


def test_older_table_uses_loop_flops(tmp_path, capsys):
    """A file without flops_counted_on: TorchLSTM gets MyLSTM's loop count, over its median, of the larger rate."""
    def row(case, gflop, median_ms):
        return {"case": case, "median_ms": median_ms, "min_ms": 0.8 * median_ms, "max_ms": 1.2 * median_ms,
                "gflop_per_step": gflop, "gflop_per_s": gflop / (median_ms / 1000),
                "share_of_matmul_rate": 0.0, "peak_memory_mib": 700.0}

    rows = [row("lstm:TorchLSTM:fused:cpu:training", 1.0, 500.0), row("lstm:MyLSTM:loop:cpu:training", 3.0, 1000.0)]
    path = tmp_path / "older.json"
    path.write_text(json.dumps({"rows": rows, "matmul_rate_flop_s": {"torch.mm": 1e10, "oneDNN linear": 2e10}}))
    assert benchmark.main(["--table", str(path)]) == 0
    printed = capsys.readouterr().out
    # 3 GFLOP over 0.5 s is 6 GFLOP/s, 30% of 20 GFLOP/s.
    assert "| lstm:TorchLSTM:fused:cpu:training | 500.0 | 400.0-600.0 | 1.00 | 3.00 | 6.0 | 30.0% | 700 |  |" in printed


def test_ratio_compares_cases_within_each_round():
    """A slow round for both cases leaves the ratio alone, while pooled medians would not."""
    reference = {"case": "lstm:TorchLSTM:fused:cpu:forward", "median_ms": 20.0, "round_medians_ms": [10.0, 20.0, 40.0]}
    mine = {"case": "lstm:MyLSTM:fused:cpu:forward", "median_ms": 44.0, "round_medians_ms": [11.0, 44.0, 44.0]}
    assert benchmark.ratio_to_reference(mine, reference) == pytest.approx(1.1)     # ratios 1.1, 2.2, 1.1
    assert benchmark.ratio_to_reference(dict(mine, round_medians_ms=None), reference) == pytest.approx(2.2)


def test_ratio_pairs_rounds_in_order():
    """Each round's ratio uses the reference's median of that round, not of another round."""
    reference = {"median_ms": 20.0, "round_medians_ms": [10.0, 20.0, 40.0]}
    mine = {"median_ms": 30.0, "round_medians_ms": [11.0, 30.0, 48.0]}
    assert benchmark.ratio_to_reference(mine, reference) == pytest.approx(1.2)     # ratios 1.1, 1.5, 1.2


def test_ratio_pairs_rounds_both_finished():
    """After a failure in round 3, a case that finished it is paired with its reference over rounds 1 and 2."""
    reference = {"median_ms": 15.0, "round_medians_ms": [10.0, 20.0]}
    mine = {"median_ms": 30.0, "round_medians_ms": [13.0, 22.0, 90.0]}
    assert benchmark.ratio_to_reference(mine, reference) == pytest.approx(1.2)     # ratios 1.3 and 1.1


def summary_row(case, round_medians_s):
    """Summarise a case whose rounds timed one step each, at the given seconds."""
    pooled = None
    for seconds in round_medians_s:
        pooled = benchmark.merge_rounds(pooled, {"times_s": [seconds], "flops": 1e9, "peak_memory_mib": 100.0})
    return benchmark.summarise(case, pooled, 1e10)


def test_table_ratio_matches_size_and_path():
    """The forward path's ratio is against TorchLSTM's forward row, not its training row."""
    rows = [summary_row("lstm:TorchLSTM:fused:cpu:forward", [0.010, 0.020]),
            summary_row("lstm:TorchLSTM:fused:cpu:training", [0.100, 0.200]),
            summary_row("lstm:MyLSTM:fused:cpu:forward", [0.030, 0.060])]
    lines = benchmark.markdown_table(rows).splitlines()
    forward = next(line for line in lines if line.startswith("| lstm:MyLSTM:fused:cpu:forward |"))
    assert forward.split(" | ")[3] == "3.00"


@pytest.mark.parametrize("case, message", [
    ("lstm:MyLSTM:sideways:cpu:forward", "unknown mode 'sideways'"),
    ("lstm:MyLSTM:fused:cpu:backward", "unknown path 'backward'"),
    ("lstm:Nope:fused:cpu:forward", "unknown model 'Nope'"),
    ("lstm:MyLSTM:fused:huge:forward", "unknown size 'huge'"),
    ("lstm:MyLSTM:fused:cpu:training:-NOT_A_SETTING", "the ablation must be -all, or - (off) or + (on)"),
    ("lstm:MyLSTM:fused:cpu:training:+all", "the ablation must be -all, or - (off) or + (on)"),
    ("lstm:MyLSTM:fused:cpu:training:ONEDNN_MATMUL", "the ablation must be -all, or - (off) or + (on)"),
    ("lstm:MyLSTM", "must read lstm:MODEL:MODE:SIZE:PATH"),
    ("cyclegan", "unknown case"),
])
def test_malformed_case_names_the_part(case, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        benchmark.run_case(case, repeats=1, warmup=0)


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it as JSON"), ("{not json", "cannot read it as JSON"), ("[]", "not a results file"),
    ('{"rows": []}', "not a results file"),
])
def test_table_of_bad_file_names_file(tmp_path, capsys, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit):
        benchmark.main(["--table", str(path)])
    error = capsys.readouterr().err
    assert str(path) in error
    assert message in error


def test_output_folder_rejected_before_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "matmul_rate", lambda device: pytest.fail("the run must not start"))
    with pytest.raises(SystemExit):
        benchmark.main(["--only", "cyclegan", "--output", str(tmp_path)])
    assert "is a folder" in capsys.readouterr().err


def test_output_under_proc_rejected(capsys):
    """/proc rejects new files even from root, and os.access reports every path writable to root."""
    parser = argparse.ArgumentParser()
    with pytest.raises(SystemExit):
        benchmark.writable_output(parser, "/proc/results.json")
    assert "--output /proc/results.json is not writable" in capsys.readouterr().err


def test_results_written_to_output(tmp_path):
    path = tmp_path / "results.json"
    assert benchmark.write_results(path, {"rows": [1, 2]}) == path
    assert json.loads(path.read_text()) == {"rows": [1, 2]}


def test_results_kept_when_output_fails(tmp_path, capsys):
    """The output's folder removed during the run: the results go to a temporary file, named on stderr."""
    path = tmp_path / "removed" / "results.json"
    written = benchmark.write_results(path, {"rows": [1, 2]})
    try:
        assert written != path
        assert json.loads(written.read_text()) == {"rows": [1, 2]}
        assert f"writing {path} failed" in capsys.readouterr().err
    finally:
        written.unlink(missing_ok=True)


def test_failed_case_keeps_finished_rows(tmp_path, monkeypatch, capsys):
    """The fourth case's process is killed in the first round: the three before it are written, and the status is 1."""
    cases = benchmark.all_cases("lstm")
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command[command.index("--case") + 1])
        if len(calls) == 4:
            return subprocess.CompletedProcess(command, -9, "", "Killed\n")
        result = {"times_s": [0.01 * len(calls)], "flops": 1e9, "peak_memory_mib": 100.0}
        return subprocess.CompletedProcess(command, 0, json.dumps(result) + "\n", "")

    monkeypatch.setattr(benchmark.subprocess, "run", fake_run)
    monkeypatch.setattr(benchmark, "matmul_rate", lambda device: {"torch.mm": 1e11})
    monkeypatch.setattr(benchmark, "bfloat16_matmul_rate", lambda device: None)
    monkeypatch.setattr(benchmark, "describe_machine",
                        lambda: {"cpu": "test", "torch_cpu_capability": "none", "cpu_cores": 2, "gpu": None})
    output = tmp_path / "results.json"
    assert benchmark.main(["--only", "lstm", "--rounds", "2", "--repeats", "1", "--output", str(output)]) == 1
    written = json.loads(output.read_text())
    assert [row["case"] for row in written["rows"]] == cases[:3]
    assert [row["median_ms"] for row in written["rows"]] == pytest.approx([10.0, 20.0, 30.0])
    assert written["failed"] == {"case": cases[3], "round": 1, "exit": "killed by signal 9 (SIGKILL)",
                                 "stderr_end": "Killed\n"}
    assert f"{cases[3]} failed in round 1 (killed by signal 9 (SIGKILL))" in capsys.readouterr().err


def test_results_printed_when_both_fail(tmp_path, monkeypatch, capsys):
    """With neither the output nor the temporary folder writable, the JSON goes to stdout and the status is 1."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-temporary-folder"))
    path = tmp_path / "removed" / "results.json"
    written = benchmark.write_results(path, {"rows": [1, 2]})
    printed = capsys.readouterr()
    assert written is None
    assert json.loads(printed.out) == {"rows": [1, 2]}
    assert "the results follow here as JSON" in printed.err
    assert benchmark.report_written(written) == 1


@pytest.mark.parametrize("name, row", [
    # A file with per-round medians gives the median of the per-round ratios.
    ("2026-12-04-cpu.json", "| lstm:MyLSTM:fused:cpu:training | 111.6 | 100.9-133.0 | 1.07 |"),
    # An older file without them gives the ratio of the pooled medians.
    ("2026-12-04-cpu-before-speedups.json", "| lstm:MyLSTM:fused:cpu:training | 322.6 | 309.7-334.2 | 1.11 |"),
])
def test_table_prints_committed_results(repo_root, capsys, name, row):
    assert benchmark.main(["--table", str(repo_root / "benchmarks" / "results" / name)]) == 0
    assert row in capsys.readouterr().out


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx avx2 fma

processor\t: 1
model name\t: another name that must not be read
"""


def test_cpu_identity_reads_the_first_processor():
    identity = benchmark.cpu_identity(CPUINFO)
    assert identity == {"cpu": "AMD EPYC", "cpu_family": "25", "cpu_model": "1", "avx512": False}
    with_avx512 = benchmark.cpu_identity(CPUINFO.replace("avx2 fma", "avx2 avx512f fma"))
    assert with_avx512["avx512"] is True
    assert benchmark.cpu_identity("")["avx512"] is None   # no flags line: unknown, not absent


def test_default_output_keeps_earlier_files(tmp_path):
    machine = {"date": "2026-12-04T22:55:54+00:00", "torch_cpu_capability": "AVX2"}
    first = benchmark.default_output(machine, "cpu", tmp_path)
    assert first == tmp_path / "2026-12-04-cpu-avx2.json"
    first.write_text("{}")
    second = benchmark.default_output(machine, "cpu", tmp_path)
    assert second == tmp_path / "2026-12-04-cpu-avx2-2255utc.json"
    second.write_text("{}")
    third = benchmark.default_output(machine, "cpu", tmp_path)   # a second run in the same minute
    assert third == tmp_path / "2026-12-04-cpu-avx2-2255utc-2.json"
    assert benchmark.default_output(machine, "cpu", tmp_path, kind="recurrence") == \
        tmp_path / "2026-12-04-cpu-avx2-recurrence.json"
    assert benchmark.default_output(machine, "cuda", tmp_path) == tmp_path / "2026-12-04-cuda.json"
