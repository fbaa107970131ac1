"""Execute the notebooks headless, cell by cell, with progress and a summary.

    python -m tools.run_notebooks --profile cpu --data-dir ../shared/data

Each notebook runs in a fresh kernel started in the repository root, with
the settings passed as environment variables (see docs/NOTEBOOKS.md). The
executed copy is written to REPORT_DIR/executed/<notebook>.<profile>.ipynb,
also when a cell fails, so the failing output can be inspected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("part1_lstm.ipynb", "part2_cyclegan.ipynb")
PROFILES = ("auto", "smoke", "cpu", "full")


class NotebookFailed(RuntimeError):
    """A cell raised; the message names the notebook and the cell."""


class EchoingClient(NotebookClient):
    """A NotebookClient that also passes each line a cell prints to `echo`, as it arrives."""

    def __init__(self, notebook, echo=None, **kwargs):
        super().__init__(notebook, **kwargs)
        self.echo = echo

    def output(self, outs, msg, display_id, cell_index):
        if self.echo is not None and msg["msg_type"] == "stream":
            for line in msg["content"]["text"].splitlines():
                if line.strip():
                    self.echo(line)
        return super().output(outs, msg, display_id, cell_index)


def _cell_title(cell) -> str:
    for line in cell.source.splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line[:70]
    return "(empty cell)"


def execute_notebook(notebook_path: str | os.PathLike, output_path: str | os.PathLike,
                     env: dict[str, str] | None = None, timeout_per_cell: int = 3600,
                     log=print, echo_output: bool = True) -> nbformat.NotebookNode:
    """Execute one notebook in a fresh kernel and write the executed copy.

    ``env`` is added to this process's environment for the kernel. What the
    cells print goes to ``log`` as it arrives when ``echo_output`` is true.
    Raises ``NotebookFailed`` naming the notebook and the cell when a cell raises.
    """
    notebook_path = Path(notebook_path)
    output_path = Path(output_path)
    notebook = nbformat.read(notebook_path, as_version=4)
    kernel_env = dict(os.environ)
    kernel_env.update({name: str(value) for name, value in (env or {}).items()})
    # The kernel must not inherit a non-interactive backend choice from a parent Jupyter.
    kernel_env.pop("MPLBACKEND", None)
    start = time.monotonic()

    def echo(line):
        log(f"[{notebook_path.name} {time.monotonic() - start:7.1f}s]   {line}", flush=True)

    client = EchoingClient(notebook, echo=echo if echo_output else None, timeout=timeout_per_cell,
                           kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT)}})
    code_cells = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
    failure = None
    try:
        with client.setup_kernel(env=kernel_env):
            for number, index in enumerate(code_cells, start=1):
                cell = notebook.cells[index]
                log(f"[{notebook_path.name} {time.monotonic() - start:7.1f}s] "
                    f"cell {number}/{len(code_cells)}: {_cell_title(cell)}", flush=True)
                try:
                    client.execute_cell(cell, index)
                except CellExecutionError as error:
                    failure = NotebookFailed(
                        f"{notebook_path.name}: code cell {number} of {len(code_cells)} "
                        f"(notebook cell {index}, '{_cell_title(cell)}') failed:\n{error}")
                    break
    finally:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, output_path)
    if failure is not None:
        log(f"[{notebook_path.name}] executed copy kept for inspection: {output_path}")
        raise failure
    log(f"[{notebook_path.name}] done in {time.monotonic() - start:.1f}s; "
        f"executed copy: {output_path}", flush=True)
    return notebook


def _summary_lines(report_dir: Path, started_by_notebook: dict[str, float]) -> list[str]:
    """Build one summary line per notebook from the newest results file it wrote during this run."""
    lines = []
    for name, started in started_by_notebook.items():
        part = name.split("_")[0]
        fresh = [path for path in (report_dir / "results").glob(f"{part}_*.json") if path.stat().st_mtime >= started]
        if not fresh:
            lines.append(f"{name}: no results file written")
            continue
        newest = max(fresh, key=lambda path: path.stat().st_mtime)
        results = json.loads(newest.read_text())
        headline = ", ".join(f"{key} {value}" for key, value in results.get("headline", {}).items())
        lines.append(f"{name}: profile {results.get('profile')}, device {results.get('device')}, "
                     f"wall time {results.get('wall_time_s', float('nan')):.0f} s; {headline} ({newest})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", default=list(NOTEBOOKS),
                        help="notebooks to run, in order (default: both)")
    parser.add_argument("--profile", default=os.environ.get("PROFILE", "auto"), choices=PROFILES,
                        help="settings profile (default: auto, i.e. full on a GPU, cpu otherwise)")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"),
                        help="folder with ptb/, mnist/, svhn/; downloads land here (default: data)")
    parser.add_argument("--report-dir", default=os.environ.get("REPORT_DIR", "report"),
                        help="figures/, results/ and executed/ are written below it (default: report)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override any other setting, e.g. --set TARGET_DOMAIN=synthetic")
    args = parser.parse_args(argv)

    report_dir = Path(args.report_dir).resolve()
    env = {"PROFILE": args.profile, "DATA_DIR": str(Path(args.data_dir).resolve()),
           "REPORT_DIR": str(report_dir)}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--set {item!r} is not NAME=VALUE; write e.g. --set SEED=1")
        env[name] = value

    started = {}
    for name in args.notebooks:
        path = (REPO_ROOT / name) if not Path(name).exists() else Path(name)
        if not path.exists():
            parser.error(f"notebook {name!r} not found; choose from {', '.join(NOTEBOOKS)}")
        started[path.name] = time.time()
        output = report_dir / "executed" / f"{path.stem}.{args.profile}.ipynb"
        try:
            execute_notebook(path, output, env=env)
        except NotebookFailed as error:
            print(f"\nFAILED: {error}", file=sys.stderr)
            return 1

    print("\nSummary")
    for line in _summary_lines(report_dir, started):
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
