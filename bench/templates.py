"""Ready templates against a cold start: create → the first HTTP 200 from a service inside the sandbox.

Contenders, interleaved per substrate (container, microvm): `template` = `client.create(template=...)` (restore
the template's snapshot, re-run the start command when the snapshot holds no memory, wait for the TCP probe) then
one GET; `cold` = a plain create, the same start command started in the background, then GETs until one answers
(what a caller writes without templates). The service: `sleep 1` then `python3 -m http.server` (a service with a
start-up cost). Run: `python -m bench.templates [rounds]`.
"""

from __future__ import annotations

import sys
import uuid

import dsec
from bench.harness import interleaved, progress, report
from dsec.config import ServerConfig
from dsec.server.main import serve

START = ["sh", "-c", "sleep 1 && exec python3 -m http.server 8000 --bind 127.0.0.1"]
GET = ["python3", "-c", "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/').status)"]
MEMORY_MB = 256


def _from_template(client: dsec.Client, name: str) -> None:
    with client.create(template=name, memory_mb=MEMORY_MB) as sandbox:
        assert sandbox.exec(GET).stdout == b"200\n"


def _cold(client: dsec.Client, substrate: str) -> None:
    with client.create("python", substrate, memory_mb=MEMORY_MB) as sandbox:
        sandbox.exec(["sh", "-c", f"nohup {' '.join(repr(a) for a in START)} >/dev/null 2>&1 &"])
        while sandbox.exec(GET).exit_code != 0:
            pass  # the caller's own retry loop: exactly what templates replace


def main(rounds: int = 5) -> None:
    running = serve(ServerConfig(listen="127.0.0.1:0", snapshot_gc_interval_s=0))
    figures: dict[str, str] = {}
    try:
        with dsec.Client(running.address) as client:
            for substrate in ("container", "microvm"):
                name = f"bench-{uuid.uuid4().hex[:8]}"
                info = client.templates.create(name, image="python", substrate=substrate, start=START,
                                               ready={"tcp_port": 8000}, memory_mb=MEMORY_MB)
                progress("templates", f"{substrate}: built in {info.build_ms:.0f} ms ({info.snapshot_kind})")
                try:
                    stats = interleaved(f"{substrate}: create -> first 200", {
                        "template": lambda: _from_template(client, name),
                        "cold": lambda: _cold(client, substrate),
                    }, rounds, warmup=1)
                finally:
                    client.templates.delete(name)
                figures[f"template_build_ms_{substrate}"] = f"{info.build_ms:.0f}"
                figures[f"template_create_to_200_p50_ms_{substrate}"] = f"{stats['template']['p50']:.0f}"
                figures[f"cold_create_to_200_p50_ms_{substrate}"] = f"{stats['cold']['p50']:.0f}"
                figures[f"template_vs_cold_{substrate}"] = f"{stats['template']['p50'] / stats['cold']['p50']:.2f}"
    finally:
        running.stop()
    report(figures)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
