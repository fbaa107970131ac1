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
per source digit of a confusion matrix. A value that its spec cannot show
(null, true or false, NaN, a dict where a number belongs), a results file that
is not JSON, and a ``{{`` or ``}}`` left over from a malformed placeholder all
stop the rendering with an error that names the placeholder or line.

    python -m tools.make_report            # write report/REPORT.md
    python -m tools.make_report --check    # exit 1 if REPORT.md is out of date
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_./ -]+?)\s*(?:\|\s*([^}]*?)\s*)?\}\}")


class ReportError(ValueError):
    """A placeholder that names a missing results file or key, or a value that its spec cannot show."""


def lookup(results_dir: Path, path: str, cache: dict[str, object]):
    """Return the value at `file/key/key/...` in results_dir/file.json."""
    stem, *keys = path.split("/")
    if stem not in cache:
        file = results_dir / f"{stem}.json"
        if not file.is_file():
            raise ReportError(f"results file {file} not found (placeholder {path!r}); "
                              f"run the notebook for that profile first")
        try:
            cache[stem] = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ReportError(f"results file {file} is not valid JSON ({error}), so placeholder {path!r} cannot be "
                              f"filled. Run the notebook for that profile again") from error
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


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_value(value, spec: str | None, placeholder: str) -> str:
    """Return `value` formatted by the placeholder's `spec`, or raise ReportError if the spec cannot show it."""
    def invalid(expected):
        return ReportError(f"placeholder {placeholder!r}: expected {expected}, found {json.dumps(value)[:80]}; "
                           f"fix the placeholder or rerun the notebook that writes the value")

    if spec == "argmax":
        if not isinstance(value, list) or not all(isinstance(row, list) and row and all(map(is_number, row))
                                                  for row in value):
            raise invalid("a list of non-empty rows of numbers for |argmax")
        return str([max(range(len(row)), key=row.__getitem__) for row in value])
    if spec == "text":
        if not isinstance(value, str):
            raise invalid("a string for |text")
        return value.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    if isinstance(value, str) and not spec:
        return value
    if not is_number(value):
        raise invalid("a number" + ("" if spec else " or a string"))
    if not math.isfinite(value):
        raise invalid("a finite number")
    try:
        return format(value, spec or "")
    except ValueError as error:
        raise ReportError(f"placeholder {placeholder!r}: format spec {spec!r} does not fit {value!r} "
                          f"({error})") from error


def render(template: str, results_dir: Path) -> str:
    """Return `template` with each placeholder replaced by its value, formatted."""
    cache: dict[str, object] = {}

    def substitute(match: re.Match) -> str:
        return format_value(lookup(results_dir, match.group(1), cache), match.group(2), match.group(0))

    rendered = PLACEHOLDER.sub(substitute, template)
    for number, line in enumerate(PLACEHOLDER.sub("", template).splitlines(), start=1):
        if "{{" in line or "}}" in line:       # a placeholder that the pattern did not match
            raise ReportError(f"line {number} of the template has a malformed placeholder: {line.strip()[:100]!r}; "
                              f"write it as {{{{file/key/key|spec}}}}")
    return rendered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-dir", default="report",
                        help="folder with REPORT.template.md and results/; a relative path is taken from the "
                             "repository root, as tools.run_notebooks takes it (default: report)")
    parser.add_argument("--check", action="store_true", help="only check that REPORT.md is up to date")
    args = parser.parse_args(argv)
    report_dir = REPO_ROOT / Path(args.report_dir).expanduser()
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
            option = "" if args.report_dir == "report" else f" --report-dir {args.report_dir}"
            print(f"{target} is out of date: run python -m tools.make_report{option}", file=sys.stderr)
            return 1
        print(f"{target} is up to date with the results files")
        return 0
    # Written beside the report and renamed over it, so that a failed write leaves the old report whole.
    partial = target.with_name(f".{target.name}.partial")
    try:
        partial.write_text(rendered)
        os.replace(partial, target)
    except OSError as error:
        partial.unlink(missing_ok=True)
        print(f"writing {target} failed ({error}). The previous report is unchanged", file=sys.stderr)
        return 1
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
