"""Benchmark the notebooks' training steps against this machine's matrix-multiply rate.

    .venv/bin/python -m benchmarks.benchmark                 # everything, about 13 minutes on 2 cores
    .venv/bin/python -m benchmarks.benchmark --only lstm     # the language models only
    .venv/bin/python -m benchmarks.benchmark --only cyclegan --repeats 5

Each case runs in its own Python process, so that its peak resident memory
(ru_maxrss) is its own. A case builds the model from the notebook's
definitions cells (tools/nbdefs.py), runs warm-up steps, then times repeated
training steps (forward, backward, optimiser step) and reports the median and
the spread (min, max). FLOPs are counted by torch.utils.flop_counter on one
step: matrix multiplies and convolutions, forward and backward, which is the
useful arithmetic; element-wise work is not counted. The machine's rate is the
best of a large float32 matrix multiply through torch.mm and through oneDNN,
measured in the same run. Where the CPU has bfloat16 instructions, the rate
of a bfloat16 torch.mm is recorded beside it. Results go to
benchmarks/results/<date>-<device>-<capability>.json, for example
2026-12-04-cpu-avx2.json, and a Markdown table is printed. An earlier file of
the same name is kept, and the new one gets its start time added to its name.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# Sizes of the notebooks' cpu and full profiles (PROFILE_SETTINGS in part1_lstm.ipynb).
LSTM_SIZES = {"cpu": {"embed": 200, "hidden": 200, "batch": 64, "window": 35},
              "full": {"embed": 512, "hidden": 512, "batch": 64, "window": 35}}
# Modes: "fused" is the notebook's default (LSTMRecurrence), "loop" calls MyLSTMCell.step per time
# step after one x2h matmul for the whole window, "naive" calls MyLSTMCell.forward per time step.
LSTM_MODELS = [("TorchLSTM", "fused"), ("MyLSTM", "fused"), ("MyLSTM", "loop"), ("MyLSTM", "naive"),
               ("MyLSTM_att", "fused")]
# The notebook's speed settings, on by default except two that depend on the CPU. ONEDNN_MATMUL is
# on where it has AVX-512 and MIXED_PRECISION where it has bfloat16 instructions. An ablation case
# turns one of them off (-NAME, or all of them with -all) or on (+NAME) for MyLSTM's training path
# at the cpu sizes, to show what it buys.
SPEED_SETTINGS = ("ONEDNN_MATMUL", "MIXED_PRECISION", "FUSED_ADAM", "KEEP_FREED_MEMORY")
# Settings whose default depends on the CPU, so that their ablation runs both ways.
CPU_DEPENDENT_SETTINGS = ("ONEDNN_MATMUL", "MIXED_PRECISION")
VOCAB_SIZE = 10_000


def timed(function, repeats, warmup, synchronize):
    for _ in range(warmup):
        function()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def count_flops(function):
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        function()
    return counter.get_total_flops()


def cpu_has_bfloat16():
    """Return whether PyTorch reports bfloat16 instructions on this CPU (AVX512_BF16 or AMX).

    The same check as the notebook's cpu_has_bfloat16, which decides MIXED_PRECISION's default. A
    test compares the default settings of a case with this one, so a drift between the two fails it.
    """
    import torch
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def bfloat16_matmul_rate(device, size=4096, repeats=10):
    """Return the best bfloat16 torch.mm rate in FLOP/s, or None on a CPU without bfloat16 instructions."""
    import torch
    if device.type == "cpu" and not cpu_has_bfloat16():
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return 2 * size ** 3 / min(timed(lambda: a @ b, repeats, 3, synchronize))


def matmul_rate(device, size=4096, repeats=10):
    """Best float32 matmul rate in FLOP/s through torch.mm and, on CPU, oneDNN."""
    import torch
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates = {"torch.mm": 2 * size ** 3 / min(timed(lambda: a @ b, repeats, 3, synchronize))}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        a_onednn, b_onednn = a.to_mkldnn(), b.to_mkldnn()
        rates["oneDNN linear"] = 2 * size ** 3 / min(
            timed(lambda: torch._C._nn.mkldnn_linear(a_onednn, b_onednn, None), repeats, 3, synchronize))
    return rates


def naive_hidden_states(model):
    """Replace model.hidden_states by a loop that calls the cell once per time step, x2h included."""
    def hidden_states(x):
        inputs = model.embedding(x)                                   # (B, T, E)
        h = inputs.new_zeros(x.shape[0], model.lstmcell.hidden_size)
        c = h
        outputs = []
        for t in range(x.shape[1]):
            h, c = model.lstmcell(inputs[:, t], (h, c))
            outputs.append(h)
        return torch.stack(outputs, dim=1)

    import torch
    model.hidden_states = hidden_states


def language_model_step(model, optimizer, inputs, targets, path):
    """Train a part 1 model for one step on a window of word ids, through forward_all ("training") or forward."""
    from torch import nn

    if path == "training":
        loss = nn.functional.cross_entropy(model.forward_all(inputs).flatten(0, 1), targets.flatten())
    else:
        loss = nn.functional.cross_entropy(model(inputs), targets[:, -1])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def lstm_case(model_name, mode, size_name, path, repeats, warmup, overrides=None):
    import torch

    from tools.nbdefs import load_definitions
    env = {"PROFILE": "smoke", **{name: "1" if on else "0" for name, on in (overrides or {}).items()}}
    part1 = load_definitions(REPO_ROOT / "part1_lstm.ipynb", env=env)
    device = part1.DEVICE
    size = LSTM_SIZES[size_name]
    inputs = torch.randint(VOCAB_SIZE, (size["batch"], size["window"]), device=device)
    targets = torch.randint(VOCAB_SIZE, (size["batch"], size["window"]), device=device)

    def build(name, fused):
        torch.manual_seed(0)
        model = part1.MODEL_CLASSES[name](VOCAB_SIZE, size["embed"], size["hidden"], 0.2).to(device)
        if hasattr(model, "fused"):
            model.fused = fused
        return model, part1.make_optimizer(model, 1e-3)

    def step_of(model, optimizer):
        def step():
            language_model_step(model, optimizer, inputs, targets, path)
        return step

    # FLOPs: FlopCounterMode counts plain matrix multiplies only, not oneDNN's operators nor PyTorch's
    # fused LSTM kernel. So they are counted on the same model run as a plain loop with oneDNN off
    # (MyLSTM's for TorchLSTM, which does the same arithmetic).
    onednn = part1.ONEDNN_MATMUL
    part1.ONEDNN_MATMUL = False
    flops = count_flops(step_of(*build("MyLSTM" if model_name == "TorchLSTM" else model_name, fused=False)))
    part1.ONEDNN_MATMUL = onednn

    model, optimizer = build(model_name, fused=mode == "fused")
    if mode == "naive":
        naive_hidden_states(model)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = timed(step_of(model, optimizer), repeats, warmup, synchronize)
    return {"flops": flops, "times_s": times, "settings": {name: getattr(part1, name) for name in SPEED_SETTINGS}}


def cyclegan_case(size_name, repeats, warmup):
    import torch

    from tools.nbdefs import load_definitions
    part2 = load_definitions(REPO_ROOT / "part2_cyclegan.ipynb",
                             env={"PROFILE": size_name, "TARGET_DOMAIN": "synthetic"})
    return part2.benchmark_iteration(repeats=repeats, warmup=warmup, count_flops=count_flops,
                                     timed=timed, torch=torch)


def parse_lstm_case(case):
    """Split lstm:MODEL:MODE:SIZE:PATH[:-SETTING|:+SETTING] into its parts, or raise ValueError naming a bad one.

    The last part is a dict of the speed settings that the ablation forces off (-) or on (+).
    """
    parts = case.split(":")[1:]
    if len(parts) not in (4, 5):
        raise ValueError(f"case {case!r} must read lstm:MODEL:MODE:SIZE:PATH or "
                         f"lstm:MODEL:MODE:SIZE:PATH:-SETTING (or +SETTING), e.g. lstm:MyLSTM:fused:cpu:training")
    model_name, mode, size_name, path, *ablation = parts
    choices = {"model": (model_name, sorted({name for name, _ in LSTM_MODELS})),
               "mode": (mode, ["fused", "loop", "naive"]), "size": (size_name, sorted(LSTM_SIZES)),
               "path": (path, ["forward", "training"])}
    for what, (value, valid) in choices.items():
        if value not in valid:
            raise ValueError(f"case {case!r}: unknown {what} {value!r}, expected one of {', '.join(valid)}")
    overrides = {}
    if ablation:
        sign, name = ablation[0][:1], ablation[0][1:]
        if sign not in ("-", "+") or name not in (*SPEED_SETTINGS, "all") or (sign, name) == ("+", "all"):
            raise ValueError(f"case {case!r}: the ablation must be -all, or - (off) or + (on) followed by one of "
                             f"{', '.join(SPEED_SETTINGS)}")
        overrides = {setting: sign == "+" for setting in (SPEED_SETTINGS if name == "all" else [name])}
    return model_name, mode, size_name, path, overrides


def run_case(case, repeats, warmup):
    """Run one case in this process and return its measurements."""
    kind, _, size_name = case.partition(":")
    if kind == "lstm":
        *spec, overrides = parse_lstm_case(case)
        result = lstm_case(*spec, repeats, warmup, overrides)
    elif kind == "cyclegan" and size_name in ("cpu", "full"):
        result = cyclegan_case(size_name, repeats, warmup)
    else:
        raise ValueError(f"unknown case {case!r}: expected lstm:MODEL:MODE:SIZE:PATH or cyclegan:cpu|full")
    # ru_maxrss is in KiB on Linux.
    result["peak_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def all_cases(only):
    cases = []
    if only in (None, "lstm"):
        for size_name in LSTM_SIZES:
            for path in ("forward", "training"):
                for model_name, mode in LSTM_MODELS:
                    cases.append(f"lstm:{model_name}:{mode}:{size_name}:{path}")
        for name in (*SPEED_SETTINGS, "all"):
            cases.append(f"lstm:MyLSTM:fused:cpu:training:-{name}")
        # One of each pair equals the default.
        cases += [f"lstm:MyLSTM:fused:cpu:training:+{name}" for name in CPU_DEPENDENT_SETTINGS]
    if only in (None, "cyclegan"):
        cases += ["cyclegan:cpu", "cyclegan:full"]
    return cases


def cpu_identity(cpuinfo_text):
    """Read the model name, family and model numbers, and whether AVX-512 is present, from /proc/cpuinfo.

    Hosts with one model name differ: two machines of this project, both "AMD EPYC" with 2 cores,
    measured float32 matmul rates of 354 to 448 and of 134 to 182 GFLOP/s.
    """
    fields = {}
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())   # the first processor's values
    flags = fields.get("flags", "").split()
    return {"cpu": fields.get("model name"), "cpu_family": fields.get("cpu family"),
            "cpu_model": fields.get("model"), "avx512": "avx512f" in flags if flags else None}


def source_version():
    """Return the repository's commit and whether the working tree differs from it, or None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "uncommitted_changes": bool(status.strip())}


def describe_machine():
    import torch
    cpuinfo = Path("/proc/cpuinfo")
    identity = cpu_identity(cpuinfo.read_text()) if cpuinfo.exists() else {}
    return {"cpu": identity.get("cpu") or platform.processor() or platform.machine(),
            "cpu_family": identity.get("cpu_family"), "cpu_model": identity.get("cpu_model"),
            "avx512": identity.get("avx512"),
            # The widest vector instructions PyTorch's own kernels use here, e.g. AVX2 or AVX512.
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bfloat16": cpu_has_bfloat16(),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "source": source_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def default_output(machine, device_type, folder, kind=""):
    """Return the path `<date>-<device>[-<capability>][-<kind>].json` in `folder` that no file takes yet.

    A CPU run names the vector capability (cpu-avx2, cpu-avx512), so that runs on different hosts
    can be distinguished. Where that name is taken, the run's start time is added (`-2356utc`), and
    then a counter (`-2356utc-2`), so a later run never replaces an earlier run's results.
    """
    name = f"{machine['date'][:10]}-{device_type}"
    if device_type == "cpu" and machine.get("torch_cpu_capability"):
        name += "-" + machine["torch_cpu_capability"].lower()
    if kind:
        name += f"-{kind}"
    path = folder / f"{name}.json"
    if not path.exists():
        return path
    name += f"-{machine['date'][11:16].replace(':', '')}utc"
    path = folder / f"{name}.json"
    counter = 2
    while path.exists():
        path = folder / f"{name}-{counter}.json"
        counter += 1
    return path


def merge_rounds(pooled, result):
    """Pool the timed steps of one more round of a case; keep the largest peak memory.

    Each round's median is kept too (`round_medians_s`), for ratios within a round. The data share
    of the CycleGAN cases is the last round's.
    """
    merged = dict(result)
    round_median = statistics.median(result["times_s"])
    if pooled is None:
        merged["round_medians_s"] = [round_median]
        return merged
    merged["times_s"] = pooled["times_s"] + result["times_s"]
    merged["round_medians_s"] = pooled["round_medians_s"] + [round_median]
    merged["peak_memory_mib"] = max(pooled["peak_memory_mib"], result["peak_memory_mib"])
    return merged


def summarise(case, result, machine_rate):
    times = result["times_s"]
    median = statistics.median(times)
    row = {"case": case, "median_ms": 1000 * median, "min_ms": 1000 * min(times), "max_ms": 1000 * max(times),
           "gflop_per_step": result["flops"] / 1e9, "gflop_per_s": result["flops"] / median / 1e9,
           "share_of_matmul_rate": result["flops"] / median / machine_rate,
           "peak_memory_mib": result["peak_memory_mib"]}
    if "round_medians_s" in result:
        row["round_medians_ms"] = [1000 * seconds for seconds in result["round_medians_s"]]
    for key in ("data_share", "data_ms", "settings"):
        if key in result:
            row[key] = result[key]
    return row


def ratio_to_reference(row, reference):
    """Return the median over rounds of row's time over reference's time in the same round.

    A case and its reference run a few seconds to two minutes apart in a round, closer than the
    rounds are to each other, so most of the drift of the machine's speed between rounds cancels.
    Where a failed case stopped the run, the cases before it in that round have one round more than
    the cases after it. Every round runs the cases in the same order, so the rounds that both
    finished are the first ones, and only those are paired. Results files without per-round medians
    (written before they were kept) fall back to the ratio of the pooled medians.
    """
    mine, theirs = row.get("round_medians_ms"), reference.get("round_medians_ms")
    if mine and theirs:
        return statistics.median(a / b for a, b in zip(mine, theirs))     # zip stops at the end of the shorter list
    return row["median_ms"] / reference["median_ms"]


def attribute_reference_flops(rows, machine_rate):
    """Give every language-model row the FLOPs counted for the `loop` mode of the same math.

    All modes of a model do the same arithmetic, but FlopCounterMode does not count inside
    PyTorch's fused LSTM kernel (TorchLSTM) nor oneDNN's operators, and the modes' counts differ a
    little: the fused recurrence's backward also computes the gradient of the initial hidden state,
    a zero tensor that the loop's autograd needs no gradient for. The `loop` mode runs every matmul
    as a plain op, so its count is used for all modes of the model, and MyLSTM's for TorchLSTM.
    """
    counted = {}
    for row in rows:
        parts = row["case"].split(":")
        if parts[0] == "lstm" and parts[2] == "loop":
            counted[(parts[1], parts[3], parts[4])] = row.get("gflop_counted", row["gflop_per_step"])
    for row in rows:
        parts = row["case"].split(":")
        if parts[0] != "lstm":
            continue
        source = "MyLSTM" if parts[1] == "TorchLSTM" else parts[1]
        key = (source, parts[3], parts[4])
        if key not in counted:
            continue
        row.setdefault("gflop_counted", row["gflop_per_step"])
        row["gflop_per_step"] = counted[key]
        row["gflop_per_s"] = row["gflop_per_step"] / (row["median_ms"] / 1000)
        row["share_of_matmul_rate"] = row["gflop_per_s"] * 1e9 / machine_rate
        row["flops_from"] = f"lstm:{source}:loop"
    return rows


def markdown_table(rows):
    lines = ["| case | median ms | min-max ms | ratio to TorchLSTM | GFLOP/step | GFLOP/s | share of matmul rate | "
             "peak MiB | data share |", "|" + " --- |" * 9]
    reference = {}
    for row in rows:
        parts = row["case"].split(":")
        if parts[0] == "lstm" and parts[1] == "TorchLSTM":
            reference[(parts[3], parts[4])] = row
    for row in rows:
        parts = row["case"].split(":")
        ratio = ""
        if parts[0] == "lstm" and (parts[3], parts[4]) in reference:     # missing where its run failed
            ratio = f"{ratio_to_reference(row, reference[(parts[3], parts[4])]):.2f}"
        data = f"{100 * row['data_share']:.1f}%" if "data_share" in row else ""
        lines.append(f"| {row['case']} | {row['median_ms']:.1f} | {row['min_ms']:.1f}-{row['max_ms']:.1f} | "
                     f"{ratio} | {row['gflop_per_step']:.2f} | {row['gflop_per_s']:.1f} | "
                     f"{100 * row['share_of_matmul_rate']:.1f}% | {row['peak_memory_mib']:.0f} | {data} |")
    return "\n".join(lines)


def writable_output(parser, output):
    """Return `output` as a Path after checking that a results file can be written there.

    Checked before the run, so that a long run does not end with its results unwritable.
    """
    path = Path(output)
    if path.is_dir():
        parser.error(f"--output {output} is a folder: give a file name, e.g. {path / 'results.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--output {output}: cannot create its folder ({error}); choose another path")
    try:
        # A real file, because os.access reports paths writable to root where writing fails (/proc, immutable files).
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".write-check-"):
            pass
        if path.exists():
            with open(path, "a"):
                pass
    except OSError as error:
        parser.error(f"--output {output} is not writable ({error.strerror or error}); choose another path")
    return path


def write_results(path, results):
    """Write `results` as JSON to `path` and return the path written.

    Where that fails (a folder removed during the run, a full disk), the results go to a new file in
    the temporary folder instead, named on stderr, so that a run's measurements are not lost. Where
    that fails too, the JSON goes to stdout, the reason to stderr, and the result is None.
    """
    text = json.dumps(results, indent=2)
    try:
        path.write_text(text)
        return path
    except OSError as error:
        first_error = error.strerror or error
    try:
        handle, fallback = tempfile.mkstemp(prefix=f"{path.stem}-", suffix=".json")
        with os.fdopen(handle, "w") as file:
            file.write(text)
    except OSError as error:
        print(f"writing {path} failed ({first_error}), and so did a file in {tempfile.gettempdir()} "
              f"({error.strerror or error}), so the results follow here as JSON", file=sys.stderr)
        print(text)
        return None
    print(f"writing {path} failed ({first_error}), so the results went to {fallback}", file=sys.stderr)
    return Path(fallback)


def report_written(written):
    """Print where `write_results` put the results, and return the exit status: 0 for a file, 1 for none."""
    if written is None:
        return 1
    print(f"\nwrote {written}")
    return 0


def read_results(parser, table):
    """Load a results file of this script for --table, or exit with an error that names the file."""
    try:
        recorded = json.loads(Path(table).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        parser.error(f"--table {table}: cannot read it as JSON ({type(error).__name__}: {error})")
    if not isinstance(recorded, dict) or not {"rows", "matmul_rate_flop_s"} <= recorded.keys():
        parser.error(f"--table {table} is not a results file of this script (it needs the keys rows and "
                     f"matmul_rate_flop_s); benchmarks/results/<date>-<device>.json files are")
    return recorded


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["lstm", "cyclegan"],
                        help="run only the language-model cases or only the CycleGAN cases")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per case (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of every case, interleaved; the timed steps of all rounds are pooled (default 2)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    parser.add_argument("--output", help="results JSON (default: benchmarks/results/<date>-<device>"
                                         "[-<capability>].json, never replacing an earlier run's file)")
    parser.add_argument("--table", metavar="JSON",
                        help="print the Markdown table of an earlier results file and exit")
    args = parser.parse_args(argv)
    if args.table is not None:
        recorded = read_results(parser, args.table)
        if "flops_counted_on" not in recorded:   # an older file: it counted FLOPs per case as run
            attribute_reference_flops(recorded["rows"], max(recorded["matmul_rate_flop_s"].values()))
        print(markdown_table(recorded["rows"]))
        return 0
    if args.repeats < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error(f"--repeats and --rounds must be at least 1 and --warmup at least 0, got "
                     f"{args.repeats}, {args.rounds} and {args.warmup}")

    if args.case:
        try:
            print(json.dumps(run_case(args.case, args.repeats, args.warmup)))
        except ValueError as error:
            parser.error(str(error))
        return 0

    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = describe_machine()
    output = writable_output(parser, args.output or default_output(
        machine, device.type, REPO_ROOT / "benchmarks" / "results"))
    rates = matmul_rate(device)
    machine_rate = max(rates.values())
    # Recorded beside the float32 rates, not used for the shares, which are of the float32 rate.
    bfloat16_rate = bfloat16_matmul_rate(device)
    print(f"{machine['cpu']} ({machine['torch_cpu_capability']}), {machine['cpu_cores']} cores, "
          f"GPU {machine['gpu']}; float32 matmul: "
          + ", ".join(f"{name} {rate / 1e9:.0f} GFLOP/s" for name, rate in rates.items())
          + ("" if bfloat16_rate is None else f"; bfloat16 torch.mm {bfloat16_rate / 1e9:.0f} GFLOP/s"), flush=True)

    # Every case runs once per round, in the same order each round, so that a slow spell of a shared
    # machine falls on all cases alike instead of on the few that ran during it.
    cases = all_cases(args.only)
    results, failure = run_rounds(cases, args)
    rows = [summarise(case, result, machine_rate) for case, result in results.items() if result is not None]

    record = {"machine": machine, "matmul_rate_flop_s": rates, "bfloat16_matmul_rate_flop_s": bfloat16_rate,
              "repeats": args.repeats, "warmup": args.warmup, "rounds": args.rounds,
              "flops_counted_on": "the same model run as a plain loop with oneDNN off (MyLSTM for TorchLSTM)",
              "rows": rows}
    if failure is not None:
        record["failed"] = failure            # the rows hold the rounds that finished before it
    written = write_results(output, record)
    print()
    print(markdown_table(rows))
    status = report_written(written)
    if failure is not None:
        print(f"\n{failure['case']} failed in round {failure['round']} ({failure['exit']}), so the run stopped. "
              f"The results file keeps the rounds finished before it", file=sys.stderr)
        return 1
    return status


def exit_description(code):
    """Return a subprocess's return code in words: an exit status, or the signal that killed it."""
    if code >= 0:
        return f"exit status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "a signal unknown to Python"
    return f"killed by signal {-code} ({name})"


def run_rounds(cases, args):
    """Run every case once per round, each in a process of its own, and return ({case: pooled result}, failure).

    The result of a case is None until one of its rounds finishes. A case that fails stops the run. The
    failure then records the case, round, exit status and the end of its stderr, and is None where every
    case finished.
    """
    results = {case: None for case in cases}
    for round_number in range(1, args.rounds + 1):
        for case in cases:
            command = [sys.executable, "-m", "benchmarks.benchmark", "--case", case,
                       "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
            completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
            if completed.returncode != 0:
                exit_text = exit_description(completed.returncode)
                print(f"{case}: failed, {exit_text}\n{completed.stderr[-2000:]}", file=sys.stderr)
                return results, {"case": case, "round": round_number, "exit": exit_text,
                                 "stderr_end": completed.stderr[-2000:]}
            result = json.loads(completed.stdout.strip().splitlines()[-1])
            results[case] = merge_rounds(results[case], result)
            median_ms = 1000 * statistics.median(result["times_s"])
            print(f"round {round_number}/{args.rounds} {case:44s} {median_ms:8.1f} ms "
                  f"{result['peak_memory_mib']:6.0f} MiB", flush=True)
    return results, None


if __name__ == "__main__":
    sys.exit(main())
