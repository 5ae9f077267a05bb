"""The measured results docs/results.md renders (results/*.csv) stay machine-readable."""
import csv
from pathlib import Path

import pytest

RESULTS = sorted((Path(__file__).resolve().parents[1] / "results").glob("*.csv"))


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_every_results_row_has_its_headers_columns(path):
    """A command with commas outside its quotes once split a row of transfer_probes.csv into 41 fields."""
    with path.open(newline="") as handle:
        header, *rows = csv.reader(handle)
    assert rows, f"{path.name}: no rows"
    bad = [(number, len(row)) for number, row in enumerate(rows, start=1) if len(row) != len(header)]
    assert not bad, f"{path.name}: rows (number, fields) {bad} do not have the header's {len(header)} fields"
