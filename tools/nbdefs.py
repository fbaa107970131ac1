"""Load a notebook's definitions as a Python module, for tests and benchmarks.

Each notebook has one code cell tagged ``parameters``, with every setting as a
plain literal, and code cells tagged ``definitions``, with imports, classes and
functions. The definitions train and download nothing. This module executes exactly
those cells, in notebook order, in a fresh module, and nothing else:

    from tools.nbdefs import load_definitions
    part1 = load_definitions("part1_lstm.ipynb", env={"PROFILE": "smoke"})
    cell = part1.MyLSTMCell(8, 16)

Environment variables named like a setting override it. The notebooks read
them in their own settings code, so ``env`` is applied to ``os.environ``
while the cells run and restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from pathlib import Path

import nbformat

PARAMETERS_TAG = "parameters"
DEFINITIONS_TAG = "definitions"


def tagged_cells(notebook_path: str | os.PathLike) -> list[tuple[str, str]]:
    """Return ``(tag, source)`` for the parameters cell and each definitions cell, in order.

    Raises ``ValueError`` unless the notebook has exactly one parameters cell,
    placed before every definitions cell, and at least one definitions cell.
    """
    path = Path(notebook_path)
    notebook = nbformat.read(path, as_version=4)
    cells = []
    code_cells = (cell for cell in notebook.cells if cell.cell_type == "code")
    for number, cell in enumerate(code_cells, start=1):
        tags = set(cell.get("metadata", {}).get("tags", []))
        if PARAMETERS_TAG in tags and DEFINITIONS_TAG in tags:
            raise ValueError(f"{path}: code cell {number} is tagged both {PARAMETERS_TAG!r} and "
                             f"{DEFINITIONS_TAG!r}; give it one of the two tags.")
        if PARAMETERS_TAG in tags:
            cells.append((PARAMETERS_TAG, cell.source))
        elif DEFINITIONS_TAG in tags:
            cells.append((DEFINITIONS_TAG, cell.source))

    parameter_positions = [i for i, (tag, _) in enumerate(cells) if tag == PARAMETERS_TAG]
    if len(parameter_positions) != 1:
        raise ValueError(f"{path}: expected exactly one code cell tagged {PARAMETERS_TAG!r}, "
                         f"found {len(parameter_positions)}.")
    if parameter_positions[0] != 0:
        raise ValueError(f"{path}: the {PARAMETERS_TAG!r} cell must come before every "
                         f"{DEFINITIONS_TAG!r} cell.")
    if len(cells) < 2:
        raise ValueError(f"{path}: no code cell is tagged {DEFINITIONS_TAG!r}.")
    return cells


@contextlib.contextmanager
def _environment(overrides: dict[str, object] | None):
    saved = {name: os.environ.get(name) for name in overrides or {}}
    try:
        for name, value in (overrides or {}).items():
            os.environ[name] = str(value)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_definitions(notebook_path: str | os.PathLike,
                     env: dict[str, object] | None = None,
                     module_name: str | None = None) -> types.ModuleType:
    """Execute a notebook's parameters and definitions cells and return them as a module.

    ``env`` maps setting names to values, set as environment variables while
    the cells run. Line numbers in tracebacks point into the cell, and the
    file name names the notebook and the cell's position among the loaded ones.
    """
    path = Path(notebook_path).resolve()
    name = module_name or f"nbdefs_{path.stem}"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    module.__dict__["__notebook_path__"] = str(path)
    # Registered so that dataclasses, pickling and typing can find the module by name.
    sys.modules[name] = module
    with _environment(env):
        for position, (tag, source) in enumerate(tagged_cells(path)):
            code = compile(source, f"<{path.name} {tag} cell {position}>", "exec")
            exec(code, module.__dict__)
    return module
