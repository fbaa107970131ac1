"""Take apart one window of the LSTM recurrence: where MyLSTM's time goes against torch.nn.LSTM's.

    .venv/bin/python -m benchmarks.recurrence                # cpu and full sizes, under a minute
    .venv/bin/python -m benchmarks.recurrence --hidden 200   # one size
    .venv/bin/python -m benchmarks.recurrence --compile      # add torch.compile's recurrence

All variants run in one process, interleaved round by round, so that a slow spell of a shared
machine falls on all of them alike. Each timed call covers one window (batch 64, 35 time steps)
with the notebook's default settings (tools/nbdefs.py loads its definitions cells). The variants:

- torch.nn.LSTM, forward and backward over the window (its fused oneDNN kernel);
- run_cell_over_window with the fused recurrence, forward and backward, x2h included;
- the forward pass of LSTMRecurrence alone (x2h included, no gradients);
- only the loop's matrix products: 35 times h W_hh^T + x_gates through linear(), with W_hh
  packed once (as the loop does where oneDNN runs the products) and unpacked, and where this
  PyTorch build has MKL's packed multiply (torch.ops.mkl._mkl_linear), through that, with W_hh
  packed once and x_gates added by a second call;
- the other matrix products, called as LSTMRecurrence calls them: x2h over the whole window
  before the forward loop, the backward loop's 35 products dz_t W_hh (plus the incoming gradient),
  and the three products over the whole window after it (dz W_xh, dz^T x and dz^T h). With the
  packed forward products these are all of a window's matrix multiplies;
- the backward loop's 35 products again, with W_hh^T packed once per window, which the notebook
  does not do. Where oneDNN is off (ONEDNN_MATMUL False, or "auto" on a CPU without AVX-512),
  nothing is packed, and the two packed variants are left out;
- torch.tanh on one step's cell state (64, H) against torch.sigmoid on one step's four gates
  (64, 4H), the reason the recurrence computes tanh through sigmoid;
- one Adam step over MyLSTM's parameters at the cpu profile's vocabulary (10,000 words), fused
  and as PyTorch's per-tensor loop;
- with --compile, the same recurrence written as plain tensor operations and compiled by
  torch.compile (inductor's C++ kernels, so it needs a C++ compiler), forward and backward over
  the window with x2h included. Its hidden states and gradients are checked against the
  notebook's recurrence first. This variant measures whether PyTorch's compiler closes the gap to
  torch.nn.LSTM. The results file records the seconds of its first call (first_call_s), which
  compiles unless the graphs are already cached, in memory for a hidden size repeated in one run
  or in inductor's on-disk cache from an earlier run.

Writes benchmarks/results/<date>-cpu-<capability>-recurrence.json (never replacing an
earlier run's file) and prints a table of medians.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.benchmark import (  # noqa: E402
    default_output,
    describe_machine,
    report_written,
    writable_output,
    write_results,
)
from tools.nbdefs import load_definitions  # noqa: E402

BATCH, STEPS, VOCAB_SIZE = 64, 35, 10_000


# MKL's packed matrix multiply, another internal operator of PyTorch's CPU compiler. None without MKL.
MKL_LINEAR_OP = getattr(torch.ops.mkl, "_mkl_linear", None) if torch.backends.mkl.is_available() else None
MKL_PACK_OP = getattr(torch.ops.mkl, "_mkl_reorder_linear_weight", None) if MKL_LINEAR_OP is not None else None


def mkl_linear(x, packed, weight, add):
    """Return x W^T + add through MKL's packed multiply, for `packed` = MKL_PACK_OP(weight, len(x))."""
    return MKL_LINEAR_OP(x, packed, weight, None, x.shape[0]).add_(add)


def plain_window(inputs, h0, c0, weight_xh, bias, weight_hh):
    """Run the LSTM over inputs (T, B, I) with plain tensor operations, for torch.compile, and return hs (T, B, H)."""
    steps, batch, _ = inputs.shape
    x_gates = torch.addmm(bias, inputs.reshape(steps * batch, -1), weight_xh.t()).view(steps, batch, -1)
    h, c = h0, c0
    hs = []
    for t in range(steps):
        i, f, g, o = (x_gates[t] + h @ weight_hh.t()).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        hs.append(h)
    return torch.stack(hs)


def compiled_variant(part1, cell, inputs, grad_outputs):
    """Compile the plain recurrence, check it against LSTMRecurrence and return (name, function, first call's seconds).

    The first call compiles the forward and backward graphs, unless torch.compile's in-memory cache
    (the same shapes earlier in this process) or inductor's on-disk cache (an earlier run) has them.
    """
    compiled = torch.compile(plain_window, dynamic=False)
    zeros = inputs.new_zeros(inputs.shape[0], cell.hidden_size)

    def run():
        bias = cell.x2h.bias + cell.h2h.bias
        return compiled(inputs.transpose(0, 1), zeros, zeros, cell.x2h.weight, bias, cell.h2h.weight)

    grad_hs = grad_outputs.transpose(0, 1)
    wrt = (inputs, cell.x2h.weight, cell.h2h.weight)
    start = time.perf_counter()
    hs = run()
    grads = torch.autograd.grad(hs, wrt, grad_hs)
    first_call_s = time.perf_counter() - start
    expected_hs = part1.run_cell_over_window(cell, inputs, fused=True).transpose(0, 1)
    expected_grads = torch.autograd.grad(expected_hs, wrt, grad_hs)
    for name, value, expected in zip(("hidden states", "input gradient", "x2h weight gradient",
                                      "h2h weight gradient"), (hs, *grads), (expected_hs, *expected_grads)):
        # Relative to the largest entry: the weight gradients sum T*B products in another order.
        error = ((value - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
        if not error <= 1e-5:
            raise RuntimeError(f"torch.compile's recurrence differs from LSTMRecurrence in its {name} "
                               f"by up to {error:.3g} of its largest entry, above the limit of 1e-05. "
                               f"Its timing would not compare the same computation, so check plain_window "
                               f"against the notebook's recurrence, or run without --compile.")

    def forward_backward():
        run().backward(grad_hs)

    return "plain recurrence compiled by torch.compile, forward+backward", forward_backward, first_call_s


def variants_for(part1, hidden, compile_too=False):
    """Return ({name: function}, {name: seconds of its first call}) for one hidden size.

    Each function runs one timed call. Only the compiled variant has a first call recorded.
    """
    torch.manual_seed(0)
    reference = nn.LSTM(hidden, hidden, batch_first=True)
    cell = part1.MyLSTMCell(hidden, hidden)
    inputs = torch.randn(BATCH, STEPS, hidden, requires_grad=True)
    grad_outputs = torch.randn(BATCH, STEPS, hidden)
    x_gates = torch.randn(STEPS, BATCH, 4 * hidden)
    zeros = torch.zeros(BATCH, hidden)
    hs = torch.randn(STEPS, BATCH, hidden)
    weight, bias = cell.h2h.weight.detach(), cell.h2h.bias.detach()
    parameters = [tensor.detach() for tensor in (cell.x2h.weight, cell.x2h.bias, weight, bias)]
    cell_state, gates = torch.randn(BATCH, hidden), torch.randn(BATCH, 4 * hidden)
    flat_inputs = torch.randn(STEPS * BATCH, hidden)
    grad_gates = torch.randn(STEPS, BATCH, 4 * hidden)
    flat_grad = grad_gates.view(-1, 4 * hidden)
    grad_hs = grad_outputs.transpose(0, 1)          # (T, B, H), a strided view as in the backward pass
    weight_xh, bias_xh = parameters[0], parameters[1]

    def torch_lstm():
        reference(inputs)[0].backward(grad_outputs)

    def my_lstm():
        part1.run_cell_over_window(cell, inputs, fused=True).backward(grad_outputs)

    def forward_pass():
        with torch.no_grad():
            part1.LSTMRecurrence.apply(inputs.detach().transpose(0, 1), zeros, zeros, *parameters)

    def products(packed):
        def run():
            used = part1.prepack(weight, BATCH) if packed else weight
            for t in range(STEPS):
                part1.linear(hs[t], used, add=x_gates[t])
        return run

    def window_x2h():
        part1.linear(flat_inputs, weight_xh, bias_xh)

    def backward_step_products(packed):
        def run():
            used = part1.prepack(weight.t().contiguous(), BATCH) if packed else weight.t()
            for t in range(STEPS):
                part1.linear(grad_gates[t], used, add=grad_hs[t])
        return run

    def mkl_products():
        packed = MKL_PACK_OP(weight, BATCH)
        for t in range(STEPS):
            mkl_linear(hs[t], packed, weight, x_gates[t])

    def backward_window_products():
        part1.linear(flat_grad, weight_xh.t())                              # dz W_xh
        part1.linear(flat_inputs.t(), flat_grad.t()).t()                     # dz^T x
        part1.linear(hs.reshape(-1, hidden).t(), flat_grad.t()).t()          # dz^T h

    model = part1.MyLSTM(VOCAB_SIZE, hidden, hidden, 0.0)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    adam_fused = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    adam_loop = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)

    variants = {"torch.nn.LSTM forward+backward": torch_lstm,
                "MyLSTM recurrence forward+backward": my_lstm,
                "LSTMRecurrence forward, x2h included": forward_pass,
                "35 products, W_hh packed": products(True),
                "35 products, W_hh not packed": products(False),
                "x2h product over the window": window_x2h,
                "backward: 35 products dz_t W_hh": backward_step_products(False),
                "backward: 35 products dz_t W_hh, W_hh^T packed": backward_step_products(True),
                "backward: 3 products over the window": backward_window_products,
                "35 times tanh of (64, H)": lambda: [torch.tanh(cell_state) for _ in range(STEPS)],
                "35 times sigmoid of (64, 4H)": lambda: [torch.sigmoid(gates) for _ in range(STEPS)],
                "Adam step, fused": adam_fused.step,
                "Adam step, per-tensor loop": adam_loop.step}
    if not part1.prepack(weight, BATCH).is_mkldnn:
        # prepack returns W_hh as it is where oneDNN is off, so a "packed" row would time the unpacked products.
        del variants["35 products, W_hh packed"], variants["backward: 35 products dz_t W_hh, W_hh^T packed"]
    if MKL_LINEAR_OP is not None:
        variants["35 products through MKL's packed multiply"] = mkl_products
    first_call_seconds = {}
    if compile_too:
        name, function, first_call_s = compiled_variant(part1, cell, inputs, grad_outputs)
        variants[name] = function
        first_call_seconds[name] = first_call_s
    return variants, first_call_seconds


def measure(variants, rounds, warmup):
    for function in variants.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, function in variants.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[200, 512],
                        help="hidden sizes (embedding size equal), default 200 512: the cpu and full profiles")
    parser.add_argument("--rounds", type=int, default=40, help="timed calls per variant (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per variant first (default 5)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the recurrence compiled by torch.compile (needs a C++ compiler; "
                             "compiling took about 17 s per hidden size, plus about 7 s once, "
                             "on a 2-core AMD EPYC with an empty inductor cache)")
    parser.add_argument("--output", help="results JSON (default: benchmarks/results/"
                                         "<date>-cpu-<capability>-recurrence.json)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or min(args.hidden) < 1:
        parser.error(f"--rounds and --hidden must be at least 1 and --warmup at least 0, got "
                     f"{args.rounds}, {args.hidden} and {args.warmup}")

    part1 = load_definitions(REPO_ROOT / "part1_lstm.ipynb", env={"PROFILE": "smoke"})
    if part1.DEVICE.type != "cpu":
        parser.error("this breakdown is for the CPU paths; run it where CUDA is not available")
    machine = describe_machine()
    output = writable_output(parser, args.output or default_output(
        machine, "cpu", REPO_ROOT / "benchmarks" / "results", kind="recurrence"))
    rows = []
    for hidden in args.hidden:
        variants, first_call_seconds = variants_for(part1, hidden, args.compile)
        times = measure(variants, args.rounds, args.warmup)
        for name, samples in times.items():
            row = {"hidden": hidden, "variant": name, "median_ms": 1000 * statistics.median(samples),
                   "min_ms": 1000 * min(samples), "max_ms": 1000 * max(samples)}
            if name in first_call_seconds:
                row["first_call_s"] = first_call_seconds[name]
            rows.append(row)

    print("| hidden | variant | median ms | min-max ms | per time step µs |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        per_step = "" if row["variant"].startswith("Adam") else f"{1000 * row['median_ms'] / STEPS:.0f}"
        print(f"| {row['hidden']} | {row['variant']} | {row['median_ms']:.2f} | "
              f"{row['min_ms']:.2f}-{row['max_ms']:.2f} | {per_step} |")
    written = write_results(output, {"machine": machine, "batch": BATCH, "steps": STEPS, "rounds": args.rounds,
                                     "warmup": args.warmup, "settings": {name: getattr(part1, name) for name in (
                                         "ONEDNN_MATMUL", "FUSED_ADAM", "KEEP_FREED_MEMORY")},
                                     "written": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                                     "rows": rows})
    return report_written(written)


if __name__ == "__main__":
    sys.exit(main())
