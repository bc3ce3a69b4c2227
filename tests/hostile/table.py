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


ROWS: list[Row] = []


def record(case: str, attempt: str, outcome: str, contained: bool) -> bool:
    """Add a row; returns `contained` so a test can `assert record(...)`."""
    ROWS.append(Row(case, attempt, " ".join(outcome.split())[:90], contained))
    return contained


def render(rows: list[Row]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("case", "attempt", "outcome")]
    widths = [max(w, len(h)) for w, h in zip(widths, ("case", "attempt", "outcome"))]
    lines = [f"{'case':<{widths[0]}}  {'attempt':<{widths[1]}}  {'outcome':<{widths[2]}}  result"]
    for r in rows:
        lines.append(f"{r.case:<{widths[0]}}  {r.attempt:<{widths[1]}}  {r.outcome:<{widths[2]}}  {'contained' if r.contained else 'ESCAPED'}")
    escapes = sum(not r.contained for r in rows)
    lines.append(f"{len(rows)} attempts, {escapes} escapes")
    return lines


def dump_if_requested(rows: list[Row]) -> None:
    target = os.environ.get(REPORT_ENV)
    if target:
        Path(target).write_text(json.dumps([asdict(r) for r in rows]))
