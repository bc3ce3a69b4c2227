"""The hostile suite's record: one row per attempt and substrate, printed as a table at the end of the run."""

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


ROWS: list[Row] = []


def record(case: str, attempt: str, outcome: str, contained: bool) -> bool:
    """Add a row; returns `contained` so a test can `assert record(...)`."""
    ROWS.append(Row(case, attempt, " ".join(outcome.split())[:90], contained))
    return contained


def not_applicable(case: str, attempt: str, reason: str) -> None:
    """Add an "n/a" row: listed in the table with its reason, counted neither as attempt nor as escape."""
    ROWS.append(Row(case, attempt, " ".join(reason.split())[:90], True, applies=False))


def render(rows: list[Row]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("case", "attempt", "outcome")]
    widths = [max(w, len(h)) for w, h in zip(widths, ("case", "attempt", "outcome"))]
    lines = [f"{'case':<{widths[0]}}  {'attempt':<{widths[1]}}  {'outcome':<{widths[2]}}  result"]
    for r in rows:
        result = "n/a" if not r.applies else "contained" if r.contained else "ESCAPED"
        lines.append(f"{r.case:<{widths[0]}}  {r.attempt:<{widths[1]}}  {r.outcome:<{widths[2]}}  {result}")
    escapes = sum(not r.contained for r in rows)
    lines.append(f"{sum(r.applies for r in rows)} attempts, {escapes} escapes, {sum(not r.applies for r in rows)} n/a")
    return lines


def dump_if_requested(rows: list[Row]) -> None:
    target = os.environ.get(REPORT_ENV)
    if target:
        Path(target).write_text(json.dumps([asdict(r) for r in rows]))
