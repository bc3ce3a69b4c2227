"""The hostile suite's record: one row per attempt and substrate, printed as a table at the end of the run.

The suite also records what it *defines*: every (case, test) pair pytest collected. A pair without a row is an
attempt that never reported (its test crashed before `record`, or its case could not create a sandbox), so a
consumer (bench/load.py) can tell "64 attempts, 0 escapes" from "fewer attempts ran than the suite defines".
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

REPORT_ENV = "DSEC_HOSTILE_REPORT"  # bench/load.py sets it to collect the rows as JSON


@dataclass(frozen=True)
class Row:
    case: str
    attempt: str
    outcome: str
    contained: bool
    applies: bool = True  # False: the attempt has no meaning on this substrate; the outcome says why
    test: str = ""  # the test function that recorded it: with `case`, the key into the defined attempts


ROWS: list[Row] = []
DEFINED: list[tuple[str, str]] = []  # (case, test) pairs collected: each must leave at least one row
CREATED: list[str] = []  # every sandbox id the suite created: audited on the host once its servers stopped
LEAKS: list[str] = []  # what those sandboxes left behind; any entry fails the run
_current_test = [""]


def set_current_test(name: str) -> None:
    """Called by the suite's autouse fixture, so rows name their test without each test passing it."""
    _current_test[0] = name


def record(case: str, attempt: str, outcome: str, contained: bool) -> bool:
    """Add a row; returns `contained` so a test can `assert record(...)`."""
    ROWS.append(Row(case, attempt, " ".join(outcome.split())[:90], contained, test=_current_test[0]))
    return contained


def not_applicable(case: str, attempt: str, reason: str) -> None:
    """Add an "n/a" row: listed in the table with its reason, counted neither as attempt nor as escape."""
    ROWS.append(Row(case, attempt, " ".join(reason.split())[:90], True, applies=False, test=_current_test[0]))


@dataclass(frozen=True)
class Tally:
    """What a run of the suite shows: attempts that ran, escapes among them, and defined pairs that never reported."""

    attempts: int
    escapes: int
    not_applicable: int
    missing: list[tuple[str, str]]


def tally(rows: list[Row], defined: list[tuple[str, str]]) -> Tally:
    reported = {(r.case, r.test) for r in rows}
    return Tally(
        attempts=sum(r.applies for r in rows),
        escapes=sum(not r.contained for r in rows),
        not_applicable=sum(not r.applies for r in rows),
        missing=[pair for pair in defined if pair not in reported],
    )


def render(rows: list[Row], defined: list[tuple[str, str]] | None = None) -> list[str]:
    if not rows and not defined:
        return []
    counts = tally(rows, defined or [])
    missing_note = "(no row: the test never reported)"
    cells = [(r.case, r.attempt, r.outcome) for r in rows]
    cells += [(case, test, missing_note) for case, test in counts.missing]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(("case", "attempt", "outcome"))]
    lines = [f"{'case':<{widths[0]}}  {'attempt':<{widths[1]}}  {'outcome':<{widths[2]}}  result"]
    results = ["n/a" if not r.applies else "contained" if r.contained else "ESCAPED" for r in rows]
    results += ["MISSING"] * len(counts.missing)
    for (case, attempt, outcome), result in zip(cells, results):
        lines.append(f"{case:<{widths[0]}}  {attempt:<{widths[1]}}  {outcome:<{widths[2]}}  {result}")
    lines.append(
        f"{counts.attempts} attempts, {counts.escapes} escapes, {counts.not_applicable} n/a, "
        f"{len(counts.missing)} of {len(defined or [])} defined attempts missing"
    )
    return lines


def report(rows: list[Row], defined: list[tuple[str, str]]) -> dict:
    """The JSON a consumer audits: the rows and the (case, test) pairs the run defined."""
    return {"defined": [list(pair) for pair in defined], "rows": [asdict(r) for r in rows]}


def load(data: dict) -> tuple[list[Row], list[tuple[str, str]]]:
    return [Row(**row) for row in data.get("rows", [])], [(case, test) for case, test in data.get("defined", [])]


def dump_if_requested(rows: list[Row], defined: list[tuple[str, str]]) -> None:
    target = os.environ.get(REPORT_ENV)
    if target:
        Path(target).write_text(json.dumps(report(rows, defined)))
