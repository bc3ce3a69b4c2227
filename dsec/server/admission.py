"""Admission control for creates: a global cap, per-tenant quotas, bounded concurrency and a bounded queue.

Why: a burst of 1,000 creates on a 2-core node must neither crash the server nor starve its other RPCs.
At most `max_concurrent` creates run at once (they are CPU and mount bound); up to `queue_limit` more wait
in line; anything beyond is rejected at once with RESOURCE_EXHAUSTED and a retry-after estimated from the
queue length and the recent create time, which the SDK sleeps before trying again.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dsec.errors import CapacityExceeded
from dsec.server.metrics import ADMISSION_REJECTS

_MIN_RETRY_S = 0.2
_MAX_RETRY_S = 10.0
_RETRY_JITTER_PAD = 1.25  # the SDK sleeps retry_after * uniform(0.8, 1.2)


class CreateAdmission:
    def __init__(self, max_sandboxes: int, max_concurrent: int, queue_limit: int, tenant_max: int) -> None:
        self.max_sandboxes = max_sandboxes
        self.max_concurrent = max(1, max_concurrent)
        self.queue_limit = max(0, queue_limit)
        self.tenant_max = tenant_max
        self._cond = threading.Condition()
        self._running = 0
        self._waiting = 0
        self._pending_by_tenant: Counter[str] = Counter()
        self._avg_create_s = 0.2
        self._next_place_at = 0.0  # monotonic time of the last queue place promised to a rejected create

    @property
    def pending(self) -> int:
        return self._running + self._waiting

    def _retry_after(self) -> float:
        """When a rejected create should come back. A full queue frees one place every avg create time /
        max_concurrent; successive rejected callers get successive places (each a step later than the one
        before), so a burst's rejected creates return as places free, not all at once after the whole queue
        has drained (measured here: a 100-create burst's p99 swung from 4 to 12 s on that wait alone). The
        step is padded by the SDK's +-20 % jitter. Never later than the whole queue's drain time: a caller back
        too early and rejected again must not queue behind every place promised meanwhile."""
        now = time.monotonic()
        step = self._avg_create_s / self.max_concurrent
        self._next_place_at = max(self._next_place_at, now) + step * _RETRY_JITTER_PAD
        drained = (self._waiting + 1) * step
        return round(min(_MAX_RETRY_S, max(_MIN_RETRY_S, min(self._next_place_at - now, drained))), 3)

    def _reject(self, reason: str, message: str, transient: bool = True) -> CapacityExceeded:
        """Transient rejections carry a retry-after the SDK sleeps on; a quota is policy, so it carries none."""
        ADMISSION_REJECTS.labels(reason).inc()
        if not transient:
            return CapacityExceeded(message)
        return CapacityExceeded(message, retry_after_s=self._retry_after())

    @contextmanager
    def slot(self, tenant: str, live_total: Callable[[], int], live_of_tenant: Callable[[str], int]) -> Iterator[None]:
        """Hold one create slot (waiting in line if needed) or raise CapacityExceeded right away."""
        with self._cond:
            self._check_limits(tenant, live_total, live_of_tenant)
            if self._running >= self.max_concurrent and self._waiting >= self.queue_limit:
                raise self._reject("queue_full", f"create queue full ({self.queue_limit} waiting); retry shortly")
            self._pending_by_tenant[tenant] += 1
            self._waiting += 1
            while self._running >= self.max_concurrent:
                self._cond.wait()
            self._waiting -= 1
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._pending_by_tenant[tenant] -= 1
                if not self._pending_by_tenant[tenant]:
                    del self._pending_by_tenant[tenant]
                self._cond.notify()

    def _check_limits(self, tenant: str, live_total: Callable[[], int], live_of_tenant: Callable[[str], int]) -> None:
        if live_total() + self.pending >= self.max_sandboxes:
            raise self._reject(
                "server_full", f"server at capacity ({self.max_sandboxes} sandboxes); retry later or destroy some"
            )
        if self.tenant_max and live_of_tenant(tenant) + self._pending_by_tenant[tenant] >= self.tenant_max:
            raise self._reject(
                "tenant_quota", f"tenant {tenant!r} is at its quota of {self.tenant_max} sandboxes; destroy some",
                transient=False,
            )

    def admit_claim(self, tenant: str, live_total: Callable[[], int], live_of_tenant: Callable[[str], int],
                    insert: Callable[[], None]) -> None:
        """A create served from a warm pool takes no slot (nothing to build) but obeys the same capacity and
        quota; `insert` makes it live under the same lock, so concurrent claims cannot overshoot a quota."""
        with self._cond:
            self._check_limits(tenant, live_total, live_of_tenant)
            insert()

    def try_background_slot(self, has_room: Callable[[], bool]) -> bool:
        """A slot for background work (warm-pool refills), only if one is free now and no user create is waiting
        for one: background work never delays a user's create."""
        with self._cond:
            if self._waiting or self._running >= self.max_concurrent or not has_room():
                return False
            self._running += 1
            return True

    def release_background_slot(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify()

    def record_create_time(self, seconds: float) -> None:
        """Feed the retry-after estimate (exponential moving average)."""
        self._avg_create_s = 0.8 * self._avg_create_s + 0.2 * seconds
