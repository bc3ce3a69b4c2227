"""What the Docker driver's user namespace costs at create (issue #22, docs/hardening.md).

docker_userns_create_overhead_ms  create + first exec `true` at the Docker driver (busybox from the layer store,
                                  destroys untimed): p50 on dsec's engine (`--userns-remap`) minus p50 on a second
                                  engine started here without the remap (its own socket, data root and exec root,
                                  stopped at the end). Interleaved, one sample each per round, so load from other
                                  work hits both alike. Both drivers share the agent binary and the image. The
                                  remap is daemon-wide, hence a second engine rather than a per-sandbox switch.

Usage: .venv/bin/python -m bench.docker_userns [--n 20]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from dsec.config import ServerConfig
from dsec.images.store import LayerStore
from dsec.models import SandboxSpec
from dsec.substrates.base import Exited, ImageRootfs
from dsec.substrates.container.docker_driver import DockerDriver
from dsec.substrates.container.dockerd import EngineConfig, ensure_engine, stop_engine

from bench.harness import percentile, progress, report

IMAGE = "busybox"


def plain_engine(root: Path) -> EngineConfig:
    """A second engine at Docker's default (no remap), kept apart from dsec's by every path it owns."""
    tag = secrets.token_hex(3)
    return EngineConfig(
        socket=Path(f"/run/dsec-docker-bench{tag}.sock"), data_root=root / "data",
        exec_root=Path(f"/run/dsec-docker-bench{tag}"), pidfile=Path(f"/run/dsec-docker-bench{tag}.pid"),
        log_file=root / "dockerd.log", userns_remap=False,
    )  # fmt: skip


def driver_on(url: str | None, config: ServerConfig) -> DockerDriver:
    """A Docker driver on engine `url` (dsec's own when None): DockerDriver finds its engine through $DOCKER_HOST."""
    saved = os.environ.pop("DOCKER_HOST", None)
    try:
        if url is not None:
            os.environ["DOCKER_HOST"] = url
        return DockerDriver(config)
    finally:
        os.environ.pop("DOCKER_HOST", None)
        if saved is not None:
            os.environ["DOCKER_HOST"] = saved


def create_and_exec_ms(driver: DockerDriver, image: ImageRootfs, scratch: Path) -> float:
    """Milliseconds of one create + exec `true`; the destroy after it is not timed."""
    sandbox_id = f"b{secrets.token_hex(5)}"
    state = scratch / sandbox_id
    state.mkdir()
    started = time.perf_counter()
    sandbox = driver.create(sandbox_id, SandboxSpec(image=IMAGE), image, state)
    try:
        events = list(sandbox.spawn(["true"], {}, "/").events())
        elapsed = (time.perf_counter() - started) * 1000
    finally:
        driver.destroy(sandbox)
    if events != [Exited(0, 0)]:
        raise RuntimeError(f"`true` in sandbox {sandbox_id} ended with {events}")
    return elapsed


def bench_remap(n: int) -> dict[str, str]:
    config = ServerConfig()
    scratch = Path(tempfile.mkdtemp(prefix="docker-userns-", dir=config.home))
    cfg = plain_engine(scratch / "engine")
    cfg.data_root.mkdir(parents=True)
    store = LayerStore(config.images_dir)
    try:
        drivers = {"remap": driver_on(None, config), "no_remap": driver_on(ensure_engine(cfg=cfg), config)}
        if drivers["remap"].host_base is None or drivers["no_remap"].host_base is not None:
            raise RuntimeError("expected dsec's engine to remap ids and the second engine not to")
        image = store.resolve(IMAGE)
        samples: dict[str, list[float]] = {label: [] for label in drivers}
        for i in range(n + 1):  # round 0 untimed: the plain engine imports the image
            for label, driver in drivers.items():
                ms = create_and_exec_ms(driver, image, scratch)
                if i:
                    samples[label].append(ms)
            if i and i % max(1, n // 4) == 0:
                progress("docker_userns", f"{i}/{n} rounds")
    finally:
        store.close()
        try:
            stop_engine(cfg)
        finally:
            shutil.rmtree(cfg.exec_root, ignore_errors=True)
            cfg.socket.unlink(missing_ok=True)
            shutil.rmtree(scratch, ignore_errors=True)
    p50 = {label: percentile(xs, 0.5) for label, xs in samples.items()}
    return {
        "docker_userns_create_overhead_ms": f"{p50['remap'] - p50['no_remap']:.1f}",
        "docker_create_remap_p50_ms": f"{p50['remap']:.1f}",
        "docker_create_no_remap_p50_ms": f"{p50['no_remap']:.1f}",
        "rounds": str(n),
        "load_avg_1m": f"{os.getloadavg()[0]:.1f}",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="rounds, one create per engine each")
    args = parser.parse_args()
    report(bench_remap(args.n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
