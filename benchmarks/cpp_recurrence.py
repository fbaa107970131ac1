"""Time the LSTM recurrence with each step's element-wise work fused in C++: how much of the gap it closes.

    .venv/bin/python -m benchmarks.cpp_recurrence               # both sizes, about 3 minutes on 2 cores
    .venv/bin/python -m benchmarks.cpp_recurrence --sizes cpu   # the cpu sizes only

An experiment, not a speed path of the notebooks. benchmarks/lstm_window.cpp runs the forward and
backward loops of one window, with each time step's element-wise work in one pass over the batch.
Its matrix products are the notebook's: oneDNN's linear operator with W_hh packed once per window,
where the notebook's linear() would use it, and addmm elsewhere. The x2h product and the three
products over the window in the backward pass are the notebook's linear() calls. So this measures
how close to torch.nn.LSTM the recurrence gets when the per-step call overhead of the element-wise
work is gone and only the products remain.

The kernel is compiled on first use by torch.utils.cpp_extension, which needs a C++ compiler and
ninja. The build is cached in py<Python version>/lstm_window under $TORCH_EXTENSIONS_DIR (by
default ~/.cache/torch_extensions). The results file records the seconds that building or loading
took (build_s).

Before any timing, the kernel's hidden states, last cell state and gradients are checked against
the notebook's LSTMRecurrence. Then, in one process:

1. one window (batch 64, 35 steps) forward and backward at each hidden size: torch.nn.LSTM,
   LSTMRecurrence and the C++ kernel, interleaved call by call;
2. training steps at the notebook's cpu and full sizes, through the training path (forward_all)
   and through forward, of TorchLSTM, MyLSTM and MyLSTM_att, each model with LSTMRecurrence and
   with the C++ kernel, in alternating blocks as in benchmarks/ab.py. The other settings keep the
   notebook's defaults for this CPU.

Writes benchmarks/results/<date>-cpu-<capability>-cpp-kernel.json and prints tables of medians
with ratios to torch.nn.LSTM (TorchLSTM).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.ab import alternate  # noqa: E402
from benchmarks.benchmark import (  # noqa: E402
    LSTM_SIZES,
    VOCAB_SIZE,
    default_output,
    describe_machine,
    language_model_step,
    report_written,
    writable_output,
    write_results,
)
from benchmarks.recurrence import BATCH, STEPS, measure  # noqa: E402
from tools.nbdefs import load_definitions  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "lstm_window.cpp"
# -ffast-math with -fopenmp lets GCC call glibc's vector exp (libmvec) in the element-wise loops.
COMPILER_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
# The largest difference from LSTMRecurrence allowed, relative to each tensor's largest entry.
TOLERANCE = 1e-5


def build_folder():
    """Return the folder for the kernel's build: under $TORCH_EXTENSIONS_DIR, or PyTorch's default cache."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / f"py{sys.version_info.major}{sys.version_info.minor}" / "lstm_window"


def build_kernel():
    """Compile benchmarks/lstm_window.cpp (or load the cached build) and return (module, seconds taken)."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")                  # what torch.utils.cpp_extension calls
    missing = [tool for tool, found in ((f"the C++ compiler {compiler!r} ($CXX, or c++)", shutil.which(compiler)),
                                        ("ninja", cpp_extension.is_ninja_available())) if not found]
    if missing:
        raise RuntimeError(f"building the C++ kernel needs {' and '.join(missing)}; install them "
                           f"(for example apt install g++ ninja-build) and run again")
    folder = build_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RuntimeError(f"cannot create the kernel's build folder {folder} ({error.strerror or error}); set "
                           f"TORCH_EXTENSIONS_DIR to a folder that can be written") from error
    if not os.access(folder, os.W_OK):
        raise RuntimeError(f"the kernel's build folder {folder} is not writable; set TORCH_EXTENSIONS_DIR to a "
                           f"folder that can be written")
    start = time.perf_counter()
    try:
        module = cpp_extension.load(name="lstm_window", sources=[str(SOURCE)], extra_cflags=COMPILER_FLAGS,
                                    build_directory=str(folder))
    except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as error:
        raise RuntimeError(f"building {SOURCE} in {folder} failed ({type(error).__name__}: {error}). Check that "
                           f"{compiler!r} runs and compiles C++ with PyTorch's headers (set CXX to another compiler, "
                           f"or unset it to use c++), or delete {folder} to build from scratch") from error
    return module, time.perf_counter() - start


def make_recurrence(part1, kernel):
    """Return an autograd Function with LSTMRecurrence's signature whose loops run in `kernel`."""
    linear, prepack = part1.linear, part1.prepack

    class CppRecurrence(torch.autograd.Function):
        """inputs (T, B, I), h0, c0 (B, H) and the cell's four parameters -> hs (T, B, H), h_T, c_T."""

        @staticmethod
        def forward(ctx, inputs, h0, c0, weight_xh, bias_xh, weight_hh, bias_hh):
            steps, batch, _ = inputs.shape
            flat_inputs = inputs.reshape(steps * batch, -1)
            gates = linear(flat_inputs, weight_xh, bias_xh + bias_hh).view(steps, batch, -1).contiguous()
            packed = prepack(weight_hh, batch)
            hs, cells, tanh_cells = kernel.forward(gates, weight_hh.contiguous(), h0.contiguous(), c0.contiguous(),
                                                   packed if packed.is_mkldnn else None)
            ctx.onednn = packed.is_mkldnn
            ctx.save_for_backward(flat_inputs, gates, cells, hs, tanh_cells, weight_xh, weight_hh)
            return hs[1:], hs[steps], cells[steps]

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_hs, grad_h_last, grad_c_last):
            flat_inputs, gates, cells, hs, tanh_cells, weight_xh, weight_hh = ctx.saved_tensors
            steps, batch, four_hidden = gates.shape
            hidden = four_hidden // 4

            def dense(grad, shape):
                return gates.new_zeros(shape) if grad is None else grad.contiguous()

            grad_gates, grad_h0, grad_c0 = kernel.backward(
                gates, cells, tanh_cells, weight_hh.contiguous(), dense(grad_hs, (steps, batch, hidden)),
                dense(grad_h_last, (batch, hidden)), dense(grad_c_last, (batch, hidden)), ctx.onednn)
            flat = grad_gates.view(-1, four_hidden)
            grad_inputs = linear(flat, weight_xh.t()).view(steps, batch, -1)               # dz W_xh
            grad_weight_xh = linear(flat_inputs.t(), flat.t()).t()                          # dz^T x
            grad_weight_hh = linear(hs[:-1].reshape(-1, hidden).t(), flat.t()).t()          # dz^T h
            grad_bias = flat.sum(0)
            return grad_inputs, grad_h0, grad_c0, grad_weight_xh, grad_bias, grad_weight_hh, grad_bias.clone()

    return CppRecurrence


def check_against_notebook(part1, notebook, recurrence, hidden=24, batch=5, steps=6, scale=1.0,
                           tolerance=TOLERANCE):
    """Raise RuntimeError unless `recurrence` gives the outputs and gradients of `notebook`, LSTMRecurrence.

    Random weights, inputs and initial states, scaled by `scale`, and a loss on all three outputs,
    so that every gradient path is exercised. The same values at every call. Returns the largest
    relative difference found.
    """
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cell = part1.MyLSTMCell(hidden, hidden)

    def random(*shape):
        return (scale * torch.randn(*shape, generator=generator)).requires_grad_()

    inputs, h0, c0 = random(steps, batch, hidden), random(batch, hidden), random(batch, hidden)
    parameters = [cell.x2h.weight, cell.x2h.bias, cell.h2h.weight, cell.h2h.bias]
    weights = [torch.randn(*shape, generator=generator) for shape in ((steps, batch, hidden), (batch, hidden),
                                                                      (batch, hidden))]
    wrt = (inputs, h0, c0, *parameters)
    names = ("hidden states", "h_T", "c_T", "input gradient", "h0 gradient", "c0 gradient",
             "x2h weight gradient", "x2h bias gradient", "h2h weight gradient", "h2h bias gradient")

    def run(function):
        outputs = function.apply(inputs, h0, c0, *parameters)
        loss = sum((output * weight).sum() for output, weight in zip(outputs, weights))
        return [output.detach() for output in outputs] + list(torch.autograd.grad(loss, wrt))

    worst = 0.0
    for name, value, expected in zip(names, run(recurrence), run(notebook)):
        error = ((value - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
        if not error <= tolerance:
            raise RuntimeError(f"the C++ kernel differs from LSTMRecurrence in its {name} by up to {error:.3g} "
                               f"of the largest entry, above the limit of {tolerance:g}; its timings would not "
                               f"compare the same computation, so fix benchmarks/lstm_window.cpp first")
        worst = max(worst, error)
    return worst


def window_variants(part1, notebook, recurrence, hidden):
    """Return {name: function} for one window forward and backward at `hidden` units."""
    torch.manual_seed(0)
    reference = nn.LSTM(hidden, hidden, batch_first=True)
    cell = part1.MyLSTMCell(hidden, hidden)
    inputs = torch.randn(BATCH, STEPS, hidden, requires_grad=True)
    grad_outputs = torch.randn(BATCH, STEPS, hidden)
    zeros = torch.zeros(BATCH, hidden)
    parameters = (cell.x2h.weight, cell.x2h.bias, cell.h2h.weight, cell.h2h.bias)

    def through(function):
        def run():
            hs, _, _ = function.apply(inputs.transpose(0, 1), zeros, zeros, *parameters)
            hs.transpose(0, 1).backward(grad_outputs)
        return run

    return {"torch.nn.LSTM": lambda: reference(inputs)[0].backward(grad_outputs),
            "LSTMRecurrence": through(notebook),
            "C++ kernel": through(recurrence)}


def step_variants(part1, notebook, recurrence, size, path):
    """Return {name: training step} for the three models, MyLSTM's two with each recurrence.

    `notebook` is LSTMRecurrence, passed in because the steps replace it in `part1` as they run.
    """
    inputs = torch.randint(VOCAB_SIZE, (size["batch"], size["window"]))
    targets = torch.randint(VOCAB_SIZE, (size["batch"], size["window"]))

    def step_of(model_name, function):
        torch.manual_seed(0)
        model = part1.MODEL_CLASSES[model_name](VOCAB_SIZE, size["embed"], size["hidden"], 0.2)
        optimizer = part1.make_optimizer(model, 1e-3)

        def step():
            # run_cell_over_window reads the module global LSTMRecurrence at every call.
            part1.LSTMRecurrence = function
            language_model_step(model, optimizer, inputs, targets, path)
        return step

    return {"TorchLSTM": step_of("TorchLSTM", notebook),
            "MyLSTM": step_of("MyLSTM", notebook),
            "MyLSTM, C++ kernel": step_of("MyLSTM", recurrence),
            "MyLSTM_att": step_of("MyLSTM_att", notebook),
            "MyLSTM_att, C++ kernel": step_of("MyLSTM_att", recurrence)}


def rows_of(times, **fields):
    """Build one row per variant: median, spread and ratio to the first variant, the torch.nn.LSTM one."""
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    reference = next(iter(medians.values()))
    return [{**fields, "variant": name, "median_ms": 1000 * median, "min_ms": 1000 * min(times[name]),
             "max_ms": 1000 * max(times[name]), "samples": len(times[name]), "ratio_to_torch": median / reference}
            for name, median in medians.items()]


def print_table(title, rows, key, reference):
    print(f"\n{title}\n\n| {key} | variant | median ms | min-max ms | ratio to {reference} |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row[key]} | {row['variant']} | {row['median_ms']:.2f} | {row['min_ms']:.2f}-{row['max_ms']:.2f} "
              f"| {row['ratio_to_torch']:.3f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(LSTM_SIZES), default=list(LSTM_SIZES),
                        help="the notebook's sizes to time (default: cpu full)")
    parser.add_argument("--rounds", type=int, default=40, help="timed windows per variant (default 40)")
    parser.add_argument("--blocks", type=int, default=8, help="blocks of training steps per variant (default 8)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per block (default 3)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed calls per variant first (default 3; with 0 the slower first calls count)")
    parser.add_argument("--output", help="results JSON (default: benchmarks/results/"
                                         "<date>-cpu-<capability>-cpp-kernel.json)")
    args = parser.parse_args(argv)
    if min(args.rounds, args.blocks, args.steps) < 1 or args.warmup < 0:
        parser.error(f"--rounds, --blocks and --steps must be at least 1 and --warmup at least 0, got "
                     f"{args.rounds}, {args.blocks}, {args.steps} and {args.warmup}")
    if torch.cuda.is_available():
        parser.error("the C++ kernel is for the CPU path; run it where CUDA is not available")
    machine = describe_machine()
    output = writable_output(parser, args.output or default_output(
        machine, "cpu", REPO_ROOT / "benchmarks" / "results", kind="cpp-kernel"))

    sizes = list(dict.fromkeys(args.sizes))                  # each size once, in the order given
    part1 = load_definitions(REPO_ROOT / "part1_lstm.ipynb", env={"PROFILE": "smoke"})
    print(f"building the C++ kernel in {build_folder()}, or loading its cached build (a build took 22 s on "
          f"2 cores)", flush=True)
    notebook = part1.LSTMRecurrence
    try:
        kernel, build_s = build_kernel()
        recurrence = make_recurrence(part1, kernel)
        largest_difference = check_against_notebook(part1, notebook, recurrence)
    except RuntimeError as error:                      # a failed build, or a kernel that computes otherwise
        parser.exit(1, f"error: {error}\n")
    print(f"kernel ready after {build_s:.1f} s; largest difference from LSTMRecurrence "
          f"{largest_difference:.2g} of a tensor's largest entry")

    window_rows, step_rows = [], []
    for size_name in sizes:
        size = LSTM_SIZES[size_name]
        times = measure(window_variants(part1, notebook, recurrence, size["hidden"]), args.rounds, args.warmup)
        window_rows += rows_of(times, size=size_name, hidden=size["hidden"])
    print_table("One window, forward and backward", window_rows, "size", "torch.nn.LSTM")
    for size_name in sizes:
        for path in ("training", "forward"):
            times = alternate(step_variants(part1, notebook, recurrence, LSTM_SIZES[size_name], path),
                              args.blocks, args.steps, args.warmup)
            part1.LSTMRecurrence = notebook
            step_rows += rows_of(times, size=size_name, path=path)
    print_table("Training steps", [{**row, "case": f"{row['size']}, {row['path']}"} for row in step_rows], "case",
                "TorchLSTM")

    written = write_results(output, {
        "machine": machine, "build_s": build_s, "compiler_flags": COMPILER_FLAGS,
        "largest_difference": largest_difference, "rounds": args.rounds, "blocks": args.blocks,
        "steps": args.steps, "warmup": args.warmup,
        "settings": {name: getattr(part1, name) for name in ("ONEDNN_MATMUL", "MIXED_PRECISION", "FUSED_ADAM",
                                                             "KEEP_FREED_MEMORY")},
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "windows": window_rows, "training_steps": step_rows})
    return report_written(written)


if __name__ == "__main__":
    sys.exit(main())
