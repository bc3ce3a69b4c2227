"""bench/fuzz.py end to end on its cheapest target: the coverage-guided importer fuzzer runs, counts its cases and
ends with the report line (the API and agent targets need a server and a sandbox: the bench itself runs them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_importer_fuzzing_reports_cases_and_no_crash():
    result = subprocess.run(
        [sys.executable, "-m", "bench.fuzz", "--seconds", "8", "--targets", "importers"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    last = result.stdout.strip().splitlines()[-1]
    figures = dict(item.split("=") for item in last.split())
    assert set(figures) == {"crashes", "hangs", "cases"}, last
    assert figures["crashes"] == "0" and figures["hangs"] == "0", result.stdout[-3000:]
    assert int(figures["cases"]) > 0
    assert result.returncode == 0
