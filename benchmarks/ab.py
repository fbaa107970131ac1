"""Time one speed setting on and off in one process, in alternating blocks of training steps.

    .venv/bin/python -m benchmarks.ab                       # all three settings, a few minutes on 2 cores
    .venv/bin/python -m benchmarks.ab --only onednn --blocks 16

The main benchmark runs each case in its own process, minutes apart, so a shared machine's drift
of 20% and more falls between the cases it compares. Here both variants live in one process and
take turns, in blocks of --steps timed training steps, the order flipping every block, so drift
falls on both alike. Three comparisons:

- onednn times a training step with ONEDNN_MATMUL on and off: forward_all over a 64 x 35 window,
  the loss, backward and Adam, for MyLSTM, MyLSTM_att and TorchLSTM at the part 1 cpu sizes. The
  other settings keep the notebook's defaults, unless environment variables of the same names are
  set. So on a CPU with bfloat16 instructions the output layer trains in bfloat16, and oneDNN
  affects only the recurrence. Results from before MIXED_PRECISION are not comparable there.
- mixed-precision times the same steps with MIXED_PRECISION on and off.
- channels-last times one CycleGAN iteration (all four training functions) at the part 2 cpu
  profile's widths and batch, with networks and batches in channels-last and in the default layout.

Writes benchmarks/results/<date>-cpu-<capability>-ab.json and prints a table of medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.benchmark import (  # noqa: E402
    LSTM_SIZES,
    VOCAB_SIZE,
    default_output,
    describe_machine,
    report_written,
    writable_output,
    write_results,
)
from tools.nbdefs import load_definitions  # noqa: E402

# --only choices for part 1, and the setting each one turns on and off.
LSTM_SETTINGS = {"onednn": "ONEDNN_MATMUL", "mixed-precision": "MIXED_PRECISION"}


def alternate(variants, blocks, steps, warmup):
    """Time `variants` ({name: step function}) in alternating blocks and return {name: [seconds]}."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    times = {name: [] for name in names}
    for block in range(blocks):
        for name in (names if block % 2 == 0 else names[::-1]):
            for _ in range(steps):
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
    return times


def setting_comparisons(setting, blocks, steps, warmup):
    """Yield (model, {setting value: [seconds]}) for each language model, the part 1 `setting` on and off."""
    part1 = load_definitions(REPO_ROOT / "part1_lstm.ipynb", env={"PROFILE": "smoke"})
    size = LSTM_SIZES["cpu"]
    inputs = torch.randint(VOCAB_SIZE, (size["batch"], size["window"]))
    targets = torch.randint(VOCAB_SIZE, (size["batch"], size["window"]))
    if not hasattr(part1, setting):
        raise ValueError(f"unknown part 1 setting {setting!r}: expected one of {', '.join(LSTM_SETTINGS.values())}")
    for name in ("MyLSTM", "MyLSTM_att", "TorchLSTM"):
        torch.manual_seed(0)
        model = part1.MODEL_CLASSES[name](VOCAB_SIZE, size["embed"], size["hidden"], 0.2)
        optimizer = part1.make_optimizer(model, 1e-3)

        def step_with(value, model=model, optimizer=optimizer):
            def step():
                # The setting is a module global that every matrix multiply reads when it runs.
                setattr(part1, setting, value)
                logits = model.forward_all(inputs)
                loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return step

        yield name, alternate({"on": step_with(True), "off": step_with(False)}, blocks, steps, warmup)


def channels_last_comparison(blocks, steps, warmup):
    """Return {"channels-last": [seconds], "default": [seconds]} for one CycleGAN iteration."""
    part2 = load_definitions(REPO_ROOT / "part2_cyclegan.ipynb",
                             env={"PROFILE": "cpu", "TARGET_DOMAIN": "synthetic"})

    def iteration_in(channels_last):
        gan = part2.build_cyclegan(part2.CONV_DIM_G, part2.CONV_DIM_D, channels_last=channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        generator = torch.Generator().manual_seed(0)

        def batch(channels):
            images = torch.rand(part2.BATCH_SIZE, channels, 32, 32, generator=generator) * 2 - 1
            labels = torch.randint(10, (part2.BATCH_SIZE,), generator=generator)
            return images.contiguous(memory_format=layout), labels

        m_batch, s_batch = batch(1), batch(3)
        return lambda: part2.train_iteration(gan, m_batch, s_batch)

    return alternate({"channels-last": iteration_in(True), "default": iteration_in(False)},
                     blocks, steps, warmup)


def summarise(comparison, case, times):
    """Build one row per variant, with the ratio of each median to the first variant's."""
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    first = next(iter(medians.values()))
    return [{"comparison": comparison, "case": case, "variant": name, "median_ms": 1000 * median,
             "min_ms": 1000 * min(times[name]), "max_ms": 1000 * max(times[name]),
             "steps": len(times[name]), "ratio_to_first": median / first}
            for name, median in medians.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(LSTM_SETTINGS) + ["channels-last"], help="run one comparison only")
    parser.add_argument("--blocks", type=int, default=12, help="blocks per variant (default 12)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per block (default 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default 3)")
    parser.add_argument("--output", help="results JSON (default: benchmarks/results/<date>-cpu-<capability>-ab.json)")
    args = parser.parse_args(argv)
    if args.blocks < 1 or args.steps < 1 or args.warmup < 0:
        parser.error(f"--blocks and --steps must be at least 1 and --warmup at least 0, got "
                     f"{args.blocks}, {args.steps} and {args.warmup}")
    if torch.cuda.is_available():
        parser.error("these comparisons are for the CPU paths; run them where CUDA is not available")
    machine = describe_machine()
    output = writable_output(parser, args.output or default_output(
        machine, "cpu", REPO_ROOT / "benchmarks" / "results", kind="ab"))

    rows = []
    for choice, setting in LSTM_SETTINGS.items():
        if args.only in (None, choice):
            for model_name, times in setting_comparisons(setting, args.blocks, args.steps, args.warmup):
                rows += summarise(setting, model_name, times)
    if args.only in (None, "channels-last"):
        rows += summarise("CHANNELS_LAST", "CycleGAN iteration", channels_last_comparison(
            args.blocks, args.steps, args.warmup))

    print("| setting | case | variant | median ms | min-max ms | ratio to first |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['comparison']} | {row['case']} | {row['variant']} | {row['median_ms']:.1f} | "
              f"{row['min_ms']:.1f}-{row['max_ms']:.1f} | {row['ratio_to_first']:.3f} |")
    written = write_results(output, {"machine": machine, "blocks": args.blocks, "steps": args.steps,
                                     "warmup": args.warmup, "rows": rows})
    return report_written(written)


if __name__ == "__main__":
    sys.exit(main())
