"""Render report/REPORT.md from report/REPORT.template.md and the results files.

Every number in the report comes from a placeholder, so it always equals the
value in a results file:

    {{part1_cpu/metrics/models/MyLSTM/test/perplexity|.1f}}

is the value at that path in report/results/part1_cpu.json, formatted with
Python's format spec ``.1f`` (``.1%`` gives a percentage). Without ``|spec``
the value is inserted as it is (strings, such as a ready-made table). ``|text``
escapes ``<``, ``>`` and ``|``, so that text such as ``<unk>`` shows in
Markdown, also inside a table. ``|argmax`` turns a matrix (a list of rows) into
the index of each row's largest entry, for example the digit read most often
per source digit of a confusion matrix.

    python -m tools.make_report            # write report/REPORT.md
    python -m tools.make_report --check    # exit 1 if REPORT.md is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_./ -]+?)\s*(?:\|\s*([^}]*?)\s*)?\}\}")


class ReportError(ValueError):
    """A placeholder names a results file or a key that does not exist."""


def lookup(results_dir: Path, path: str, cache: dict[str, object]):
    """Return the value at `file/key/key/...` in results_dir/file.json."""
    stem, *keys = path.split("/")
    if stem not in cache:
        file = results_dir / f"{stem}.json"
        if not file.is_file():
            raise ReportError(f"results file {file} not found (placeholder {path!r}); "
                              f"run the notebook for that profile first")
        cache[stem] = json.loads(file.read_text())
    value = cache[stem]
    for depth, key in enumerate(keys):
        if isinstance(value, list):
            try:
                value = value[int(key)]
                continue
            except (ValueError, IndexError):
                pass
        elif isinstance(value, dict) and key in value:
            value = value[key]
            continue
        raise ReportError(f"placeholder {path!r}: key {'/'.join(keys[:depth + 1])!r} not found in {stem}.json")
    return value


def render(template: str, results_dir: Path) -> str:
    cache: dict[str, object] = {}

    def substitute(match: re.Match) -> str:
        value = lookup(results_dir, match.group(1), cache)
        spec = match.group(2)
        if spec == "argmax":
            return str([max(range(len(row)), key=row.__getitem__) for row in value])
        if spec == "text":
            return str(value).replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
        return format(value, spec) if spec else str(value)

    return PLACEHOLDER.sub(substitute, template)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-dir", default=str(REPO_ROOT / "report"),
                        help="folder with REPORT.template.md and results/ (default: report)")
    parser.add_argument("--check", action="store_true", help="only check that REPORT.md is up to date")
    args = parser.parse_args(argv)
    report_dir = Path(args.report_dir)
    template = report_dir / "REPORT.template.md"
    if not template.is_file():
        print(f"template {template} not found: pass --report-dir a folder with REPORT.template.md",
              file=sys.stderr)
        return 2
    try:
        rendered = render(template.read_text(), report_dir / "results")
    except ReportError as error:
        print(f"cannot render {template}: {error}", file=sys.stderr)
        return 2
    target = report_dir / "REPORT.md"
    if args.check:
        if not target.is_file() or target.read_text() != rendered:
            print(f"{target} is out of date: run python -m tools.make_report", file=sys.stderr)
            return 1
        print(f"{target} is up to date with the results files")
        return 0
    target.write_text(rendered)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
