"""Prometheus metrics of one server, served on `ServerConfig.metrics_listen` (e.g. 127.0.0.1:9464)."""

from __future__ import annotations

import weakref
from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry()
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

CREATE_SECONDS = Histogram("dsec_create_seconds", "Sandbox create latency", ["substrate", "driver"], buckets=_BUCKETS, registry=REGISTRY)
EXEC_SECONDS = Histogram("dsec_exec_seconds", "Exec latency (start to final status)", ["substrate"], buckets=_BUCKETS, registry=REGISTRY)
EXECS = Counter("dsec_execs_total", "Execs by outcome", ["substrate", "outcome"], registry=REGISTRY)
CREATE_FAILURES = Counter("dsec_create_failures_total", "Failed creates by error", ["error"], registry=REGISTRY)
STEPS = Counter("dsec_trajectory_steps_total", "Logged tool calls by outcome (executed / replayed)", ["kind", "outcome"], registry=REGISTRY)
IMAGE_RESOLVES = Counter("dsec_image_resolves_total", "Image resolutions by outcome (hit / miss)", ["outcome"], registry=REGISTRY)
ADMISSION_REJECTS = Counter("dsec_admission_rejects_total", "Creates rejected by admission control", ["reason"], registry=REGISTRY)
PORT_CONNECTIONS = Counter("dsec_port_connections_total", "PortService connections by outcome", ["outcome"], registry=REGISTRY)
PORT_BYTES = Counter("dsec_port_bytes_total", "Bytes relayed by PortService (in = into the sandbox)", ["direction"], registry=REGISTRY)
POOL_CLAIMS = Counter("dsec_pool_claims_total", "Creates of a warm pool's shape: served from it (hit) or found it empty (miss)", ["outcome"], registry=REGISTRY)
HTTP_REQUESTS = Counter("dsec_http_requests_total", "HTTP front door requests by API and status class", ["api", "status"], registry=REGISTRY)
HTTP_SECONDS = Histogram("dsec_http_request_seconds", "HTTP front door request latency (to the end of the response)", ["api"], buckets=_BUCKETS, registry=REGISTRY)


class SandboxCollector:
    """Sandboxes by state and substrate, read from the managers at scrape time (never out of date)."""

    def __init__(self) -> None:
        self.managers: weakref.WeakSet = weakref.WeakSet()

    def collect(self):  # type: ignore[no-untyped-def]
        family = GaugeMetricFamily("dsec_sandboxes", "Live sandboxes", labels=["state", "substrate"])
        tally = Tally((s.state, s.spec.substrate) for manager in list(self.managers) for s in manager.all())
        for (state, substrate), count in sorted(tally.items()):
            family.add_metric([state, substrate], count)
        yield family


SANDBOXES = SandboxCollector()
REGISTRY.register(SANDBOXES)


def start_metrics_server(listen: str, manager):  # -> wsgiref WSGIServer (has .server_port, .shutdown())
    """Serve /metrics in a daemon thread; the caller shuts the returned server down."""
    SANDBOXES.managers.add(manager)
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=REGISTRY)
    return server
