"""What every benchmark shares, so their figures mean the same thing: nearest-rank percentiles, contenders timed
interleaved (one sample each per round, so load from other work on the machine hits all of them alike, each sample
started once the machine is quiet: bench/quiet.py), progress lines, and the last line of `key=value` pairs that
docs and tests read.

Benchmarks are modules of the `bench` package, run from the repository root as `python -m bench.<name>`; a new
one imports these with `from bench.harness import interleaved, percentile, progress, report`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from bench.quiet import wait_quiet

Stats = dict[str, float]


def percentile(samples: list[float], q: float) -> float:
    """The nearest-rank q-quantile (a measured sample, never an interpolation); NaN when nothing was measured."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def progress(bench: str, message: str) -> None:
    """One progress line, flushed at once: a long run shows where it is, and a killed one where it stopped."""
    print(f"[{bench}] {message}", flush=True)


def interleaved(title: str, contenders: dict[str, Callable[[], object]], n: int, warmup: int = 2,
                run: int = 1) -> dict[str, Stats]:
    """Time each contender n times, round-robin after `warmup` untimed calls each; print and return p50/p99 in
    milliseconds per contender. Each timed call starts once the previous one's background work is done
    (`wait_quiet`), so no contender is charged with another's.

    `run` > 1: a contender's turn in a round is one untimed call, then `run` timed ones (n / run rounds), so every
    timed call follows the same contender's own previous call: each side in its steady state, its code and data
    in the caches, as in a loop of its own calls. With `run` 1 every call follows the other contenders' calls,
    so each starts with the caches as they left them."""
    print(f"== {title}", flush=True)
    for once in contenders.values():
        for _ in range(warmup):
            once()
    samples: dict[str, list[float]] = {label: [] for label in contenders}
    rounds = max(1, n // run)
    for i in range(rounds):
        for label, once in contenders.items():
            if run > 1:
                wait_quiet()
                once()
            for _ in range(run):
                wait_quiet()
                started = time.perf_counter()
                once()
                samples[label].append((time.perf_counter() - started) * 1000)
        if (i + 1) % max(1, rounds // 4) == 0:
            print(f"  {title}: {i + 1}/{rounds} rounds", flush=True)
    results: dict[str, Stats] = {}
    for label, xs in samples.items():
        results[label] = {"p50": percentile(xs, 0.5), "p99": percentile(xs, 0.99)}
        print(f"  {label:<32} p50 {results[label]['p50']:8.2f} ms   p99 {results[label]['p99']:8.2f} ms   (n={len(xs)})",
              flush=True)
    return results


def report(figures: Mapping[str, object]) -> None:
    """The `key=value` line a benchmark ends with (values already formatted to the precision they carry)."""
    print(" ".join(f"{key}={value}" for key, value in figures.items()), flush=True)
