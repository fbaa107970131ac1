"""The recurrence breakdown script: every variant runs the notebook's code and is written to the results file."""

from __future__ import annotations

import json

from benchmarks import recurrence

PRODUCT_VARIANTS = ("35 products, W_hh packed", "x2h product over the window",
                    "backward: 35 products dz_t W_hh", "backward: 3 products over the window")


def test_breakdown_writes_every_variant(tmp_path):
    output = tmp_path / "recurrence.json"
    assert recurrence.main(["--hidden", "8", "--rounds", "2", "--warmup", "1", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    variants = {row["variant"]: row for row in results["rows"]}
    assert set(PRODUCT_VARIANTS) <= set(variants)
    assert {row["hidden"] for row in results["rows"]} == {8}
    for name, row in variants.items():
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"], name
    assert results["rounds"] == 2

