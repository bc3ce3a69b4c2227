"""bench/grpo_step.py's held-out figure over seeds: the interval it prints and the seeds it accepts.

The demo runs themselves take minutes each and are the bench's job; this checks the arithmetic of the last line
and that bad `--seeds` input is a usage error, not a stack trace.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench.grpo_step import parse_seeds, t975, t_interval

REPO = Path(__file__).resolve().parents[2]


def test_t_interval_matches_student_t_over_three_seeds():
    mean, lo, hi = t_interval([30.0, 35.0, 25.0])
    half = 4.303 * statistics.stdev([30.0, 35.0, 25.0]) / math.sqrt(3)
    assert mean == 30.0 and lo == pytest.approx(30.0 - half) and hi == pytest.approx(30.0 + half)
    assert t_interval([12.5, 12.5]) == (12.5, 12.5, 12.5)  # no spread, no width


def test_t_quantiles_past_the_table_are_close_to_the_exact_ones():
    for df, exact in ((11, 2.2010), (15, 2.1314), (20, 2.0860), (30, 2.0423), (120, 1.9799)):
        assert t975(df) == pytest.approx(exact, abs=0.003)


def test_one_run_has_no_interval():
    with pytest.raises(ValueError, match="at least 2 runs"):
        t_interval([40.0])


@pytest.mark.parametrize("text", ["0", "a,b", "1,1", ""])
def test_bad_seeds_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
        parse_seeds(text)
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("3, 5") == [3, 5]


def test_bad_seeds_on_the_command_line_are_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "bench.grpo_step", "--seeds", "x"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "--seeds takes comma-separated integers" in done.stderr
    assert "Traceback" not in done.stderr
