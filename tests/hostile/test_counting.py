"""The hostile suite's counts cannot hide: a defined attempt without a row, or a failed run, fails bench/load.py.

These run no sandbox: they check the bookkeeping that turns the suite's table into `hostile_attempts=` and
`escapes=`, including through bench/load.py itself (a real subprocess running a real, deliberately partial suite).
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from . import (
    test_escapes_files, test_escapes_kernel, test_escapes_network, test_escapes_tenancy, test_hostile,
    test_userns_escape,
)
from .conftest import CASES
from .table import Row, load, report, tally

REPO = Path(__file__).resolve().parents[2]
LOAD_BENCH = REPO / "bench" / "load.py"
ATTEMPT_MODULES = (
    test_hostile, test_escapes_kernel, test_escapes_files, test_escapes_network, test_escapes_tenancy,
    test_userns_escape,
)
ATTEMPT_TESTS = [
    name for module in ATTEMPT_MODULES for name, fn in vars(module).items()
    if name.startswith("test_") and callable(fn) and "case" in inspect.signature(fn).parameters
]  # fmt: skip
DEFINED_COUNT = len(CASES) * len(ATTEMPT_TESTS)


def _load_bench():
    spec = importlib.util.spec_from_file_location("dsec_bench_load", LOAD_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _full_run() -> tuple[list[Row], list[tuple[str, str]]]:
    defined = [(case.values[0][0], test) for case in CASES for test in ATTEMPT_TESTS]
    rows = [Row(case, test.removeprefix("test_"), "contained", True, test=test) for case, test in defined]
    return rows, defined


def test_every_module_with_attempts_is_counted_here():
    """A new attempt file must join ATTEMPT_MODULES, or the bench's expected count below would fall short of it."""
    listed = {module.__name__.rsplit(".", 1)[1] for module in ATTEMPT_MODULES}
    for path in Path(__file__).parent.glob("test_*.py"):
        if re.search(r"^def test_\w+\(case\b", path.read_text(), re.M):
            assert path.stem in listed, f"{path.name} defines attempts but is not in ATTEMPT_MODULES"


def test_tally_names_every_missing_attempt():
    rows, defined = _full_run()
    assert tally(rows, defined).missing == []
    dropped = rows.pop(7)
    counts = tally(rows, defined)
    assert counts.missing == [(dropped.case, dropped.test)]
    assert counts.attempts == len(defined) - 1


def test_audit_counts_every_attempt_and_refuses_short_or_failed_runs():
    bench = _load_bench()
    rows, defined = _full_run()
    rows[0] = Row(rows[0].case, "ptrace", "n/a: a VM", True, applies=False, test=rows[0].test)  # listed, not counted
    assert bench.audit_hostile(0, report(rows, defined)) == (len(defined) - 1, 0)
    assert load(report(rows, defined)) == (rows, defined)
    with pytest.raises(bench.HostileRunFailed, match="pytest exited 1"):
        bench.audit_hostile(1, report(rows, defined))
    with pytest.raises(bench.HostileRunFailed, match=f"1 of {len(defined)} defined attempts recorded no row"):
        bench.audit_hostile(0, report(rows[1:], defined))
    with pytest.raises(bench.HostileRunFailed, match="defined no attempts"):
        bench.audit_hostile(0, {})


def _run_load_bench(select: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.load", "--parts", "hostile", "--hostile-select", select],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


@pytest.mark.timeout(300)
def test_load_bench_fails_when_the_suite_runs_none_of_its_attempts():
    """A run that passes (only the bookkeeping test is selected) yet records no attempt must not pass."""
    result = _run_load_bench("test_tally_names_every_missing_attempt")
    assert result.returncode != 0, result.stdout[-2000:]
    assert f"{DEFINED_COUNT} of {DEFINED_COUNT} defined attempts recorded no row" in result.stderr, result.stderr[-2000:]
    assert "hostile_attempts=" not in result.stdout


@pytest.mark.timeout(300)
def test_load_bench_fails_when_the_suite_fails():
    result = _run_load_bench("no_test_has_this_name")  # pytest exits 5: nothing ran
    assert result.returncode != 0
    assert "pytest exited 5" in result.stderr, result.stderr[-2000:]
