"""Admission control on its own: bounded concurrency, bounded queue, quotas, retry-after."""

from __future__ import annotations

import threading
import time

import pytest

from dsec.errors import CapacityExceeded
from dsec.server.admission import CreateAdmission


def _hold(admission: CreateAdmission, tenant: str, release: threading.Event, entered: list, errors: list) -> None:
    try:
        with admission.slot(tenant, lambda: 0, lambda _t: 0):
            entered.append(tenant)
            release.wait(10)
    except CapacityExceeded as exc:
        errors.append(exc)


def _spawn(admission, n, tenant, release, entered, errors) -> list[threading.Thread]:
    threads = [threading.Thread(target=_hold, args=(admission, tenant, release, entered, errors)) for _ in range(n)]
    for thread in threads:
        thread.start()
    return threads


def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_at_most_max_concurrent_run_and_the_rest_wait_in_line():
    admission = CreateAdmission(max_sandboxes=100, max_concurrent=2, queue_limit=10, tenant_max=0)
    release, entered, errors = threading.Event(), [], []
    threads = _spawn(admission, 5, "t", release, entered, errors)
    _wait_for(lambda: admission.pending == 5)
    assert len(entered) == 2 and not errors
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(entered) == 5 and admission.pending == 0


def test_a_full_queue_rejects_at_once_with_a_retry_after():
    admission = CreateAdmission(max_sandboxes=100, max_concurrent=1, queue_limit=2, tenant_max=0)
    release, entered, errors = threading.Event(), [], []
    threads = _spawn(admission, 3, "t", release, entered, errors)
    _wait_for(lambda: admission.pending == 3)
    started = time.monotonic()
    with pytest.raises(CapacityExceeded) as caught:
        with admission.slot("t", lambda: 0, lambda _t: 0):
            pass
    assert time.monotonic() - started < 1.0, "a rejection must not wait"
    assert caught.value.details["retry_after_s"] > 0
    release.set()
    for thread in threads:
        thread.join(10)


def test_server_cap_counts_live_and_pending_sandboxes():
    admission = CreateAdmission(max_sandboxes=3, max_concurrent=4, queue_limit=4, tenant_max=0)
    with pytest.raises(CapacityExceeded, match="server at capacity"):
        with admission.slot("t", lambda: 3, lambda _t: 0):
            pass


def test_tenant_quota_is_per_tenant():
    admission = CreateAdmission(max_sandboxes=100, max_concurrent=4, queue_limit=4, tenant_max=2)
    live = {"a": 2, "b": 0}
    with pytest.raises(CapacityExceeded, match="tenant 'a'"):
        with admission.slot("a", lambda: 2, live.get):
            pass
    with admission.slot("b", lambda: 2, live.get):
        pass
