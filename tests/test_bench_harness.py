"""bench/harness.py: the order in which `interleaved` calls its contenders, which is what its figures mean."""

from __future__ import annotations

from bench import harness


def _calls(monkeypatch, **options) -> tuple[list[str], dict]:
    monkeypatch.setattr(harness, "wait_quiet", lambda: 0.0)  # the order is the subject here, not the quiet start
    calls: list[str] = []
    stats = harness.interleaved("order", {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, **options)
    return calls, stats


def test_one_call_each_per_round_after_the_warmup(monkeypatch) -> None:
    calls, stats = _calls(monkeypatch, n=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert set(stats) == {"a", "b"}


def test_runs_time_each_side_after_its_own_untimed_call(monkeypatch) -> None:
    calls, _ = _calls(monkeypatch, n=6, warmup=0, run=3)
    assert calls == (["a"] * 4 + ["b"] * 4) * 2  # per round and side: 1 untimed + 3 timed; 6 / 3 = 2 rounds
