"""Benchmark the crun/runc drivers: p50/p90 of create (by phase), first exec and destroy.

    python -m dsec.substrates.container.bench [-n 30] [--runtime crun --runtime runc]

Builds a one-layer busybox image from busybox-static in a temporary directory (no layer store needed) and uses a
private DSEC_HOME under it, so it neither needs nor disturbs a running server.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from dsec.config import ServerConfig
from dsec.models import SandboxSpec
from dsec.substrates.base import Exited, ImageConfig, ImageRootfs
from dsec.substrates.container.driver import container_driver

PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def busybox_image(layer: Path) -> ImageRootfs:
    """A one-layer image of busybox-static with every applet linked, like the layer store would hand over."""
    (layer / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", layer / "bin" / "busybox")
    subprocess.run(["chroot", str(layer), "/bin/busybox", "--install", "-s", "/bin"], check=True)
    for name in ("etc", "tmp", "root", "proc", "sys", "dev"):
        (layer / name).mkdir(exist_ok=True)
    return ImageRootfs("busybox-bench", "sha256:" + "0" * 64, [layer], ImageConfig(env=[f"PATH={PATH}"]))


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": round(1e3 * statistics.median(ordered), 1),
        "p90_ms": round(1e3 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1),
    }


def bench_runtime(name: str, image: ImageRootfs, home: Path, iterations: int) -> dict:
    """Sequential create → `true` → destroy cycles; one warm-up cycle first (compiles helpers, warms caches)."""
    driver = container_driver(name, ServerConfig(home=home))
    samples: dict[str, list[float]] = {}
    for i in range(iterations + 1):
        sandbox_id = f"bench-{uuid.uuid4().hex[:10]}"
        t0 = time.perf_counter()
        sb = driver.create(sandbox_id, SandboxSpec(), image, home / "sandboxes" / sandbox_id)
        t1 = time.perf_counter()
        events = list(sb.spawn(["true"], {"PATH": PATH}, "/").events())
        t2 = time.perf_counter()
        driver.destroy(sb)
        t3 = time.perf_counter()
        assert events == [Exited(0, 0)], events
        if i == 0:
            continue
        for phase, seconds in {**sb.create_timings, "create": t1 - t0, "exec": t2 - t1, "destroy": t3 - t2, "total": t3 - t0}.items():
            samples.setdefault(phase, []).append(seconds)
    return {phase: _percentiles(values) for phase, values in samples.items()}


def userns_create_ms(name: str, image: ImageRootfs, home: Path, rounds: int) -> dict[str, list[float]]:
    """Milliseconds of create + first exec `true` with and without a user namespace (userns.py), interleaved one
    sample each per round so machine load hits both alike; destroys are outside the timing. One untimed round
    first (compiles the helpers)."""
    drivers = {
        "userns": container_driver(name, ServerConfig(home=home)),
        "no_userns": container_driver(name, ServerConfig(home=home), user_namespace=False),
    }
    samples: dict[str, list[float]] = {label: [] for label in drivers}
    for i in range(rounds + 1):
        for label, driver in drivers.items():
            sandbox_id = f"bench-{uuid.uuid4().hex[:10]}"
            t0 = time.perf_counter()
            sb = driver.create(sandbox_id, SandboxSpec(), image, home / "sandboxes" / sandbox_id)
            try:
                events = list(sb.spawn(["true"], {"PATH": PATH}, "/").events())
                elapsed = time.perf_counter() - t0
            finally:
                driver.destroy(sb)
            assert events == [Exited(0, 0)], events
            if i > 0:
                samples[label].append(1e3 * elapsed)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--iterations", type=int, default=30)
    parser.add_argument("--runtime", action="append", choices=["crun", "runc"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dsec-ct-bench-") as tmp:
        image = busybox_image(Path(tmp) / "layer")
        results = {name: bench_runtime(name, image, Path(tmp) / "home", args.iterations) for name in args.runtime or ["crun", "runc"]}
    print(json.dumps({"iterations": args.iterations, "results": results}, indent=2))


if __name__ == "__main__":
    main()
