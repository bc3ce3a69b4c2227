"""Sandbox latency: dsec against the tools people would otherwise use, on the same machine and the same engine.

Three comparisons, each a speed-up factor (peer p50 / dsec p50; > 1 means dsec is faster):
  container_vs_docker_run   create + exec `true` + destroy of a busybox container through the dsec SDK
                            (driver crun, the default) against `docker run --rm IMAGE true` of the same image on
                            dsec's own Docker Engine (docker SDK, so no CLI start-up is charged to Docker).
  exec_vs_docker_exec       one exec round trip (`true`) in a running sandbox through the SDK against `docker exec`
                            (exec_create + exec_start) in a running container of the same image.
  function_vs_subprocess    a warm `sb.call(fn)` in a function sandbox against `python3 -c` in a subprocess.
Every driver (crun, runc, docker) is measured and reported; the last line is key=value pairs.

Usage: .venv/bin/python bench/sandbox_latency.py [--n 40] [--exec-n 200] [--drivers crun,runc,docker]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable

import docker

import dsec
from dsec.config import ServerConfig
from dsec.images.store import LayerStore
from dsec.substrates.container.docker_images import ensure_image
from dsec.substrates.container.dockerd import ensure_engine

IMAGE = "busybox"
FUNCTION_IMAGE = "python"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def measure(label: str, n: int, once: Callable[[], None], warmup: int = 2) -> dict[str, float]:
    """Run `once` warmup + n times; print and return p50/p99 in milliseconds."""
    for _ in range(warmup):
        once()
    samples: list[float] = []
    for i in range(n):
        started = time.perf_counter()
        once()
        samples.append((time.perf_counter() - started) * 1000)
        if (i + 1) % max(1, n // 4) == 0:
            print(f"  {label}: {i + 1}/{n}", flush=True)
    result = {"p50": percentile(samples, 0.5), "p99": percentile(samples, 0.99)}
    print(f"{label:<34} p50 {result['p50']:8.2f} ms   p99 {result['p99']:8.2f} ms   (n={n})", flush=True)
    return result


def docker_tag_of(image: str, engine: docker.DockerClient) -> str:
    """The engine's tag for a layer-store image: the very same root the dsec docker driver runs."""
    store = LayerStore(ServerConfig().images_dir)
    try:
        return ensure_image(engine, store.resolve(image))
    finally:
        store.close()


def bench_create(client: dsec.Client, drivers: list[str], n: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for driver in drivers:

        def once(driver: str = driver) -> None:
            sb = client.create(IMAGE, "container", driver=driver)
            try:
                sb.exec(["true"])
            finally:
                sb.destroy()

        try:
            results[driver] = measure(f"dsec create+exec+destroy [{driver}]", n, once)
        except dsec.DsecError as exc:
            print(f"dsec driver {driver} failed, left out: {exc}", flush=True)
    return results


def bench_exec(client: dsec.Client, drivers: list[str], n: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for driver in drivers:
        try:
            sb = client.create(IMAGE, "container", driver=driver)
        except dsec.DsecError as exc:
            print(f"dsec driver {driver} failed, left out: {exc}", flush=True)
            continue
        try:
            results[driver] = measure(f"dsec exec [{driver}]", n, lambda sb=sb: sb.exec(["true"]), warmup=5)
        finally:
            sb.destroy()
    return results


def bench_docker(engine: docker.DockerClient, tag: str, n: int, exec_n: int) -> tuple[dict[str, float], dict[str, float]]:
    run = measure("docker run --rm", n, lambda: engine.containers.run(tag, ["true"], remove=True, network_mode="none"))
    container = engine.containers.run(tag, ["sleep", "3600"], detach=True, remove=True, network_mode="none")
    try:
        api = engine.api

        def docker_exec() -> None:
            exec_id = api.exec_create(container.id, ["true"])["Id"]
            api.exec_start(exec_id)
            if api.exec_inspect(exec_id)["ExitCode"] != 0:
                raise RuntimeError("docker exec of `true` failed")

        exec_result = measure("docker exec", exec_n, docker_exec, warmup=5)
    finally:
        container.remove(force=True)
    return run, exec_result


def square(x: int) -> int:
    return x * x


def bench_function(client: dsec.Client, n: int) -> tuple[dict[str, float], dict[str, float]] | None:
    try:
        sb = client.create(FUNCTION_IMAGE, "function")
    except dsec.DsecError as exc:
        print(f"function sandbox failed, left out: {exc}", flush=True)
        return None
    try:
        ours = measure("dsec function call (warm)", n, lambda: sb.call(square, 7), warmup=5)
    finally:
        sb.destroy()
    python = "python3" if subprocess.run(["which", "python3"], capture_output=True).returncode == 0 else sys.executable
    peer = measure(
        "python3 -c subprocess", n, lambda: subprocess.run([python, "-c", "print(7 * 7)"], check=True, capture_output=True)
    )
    return ours, peer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40, help="samples of each create / docker run")
    parser.add_argument("--exec-n", type=int, default=200, help="samples of each exec / call")
    parser.add_argument("--drivers", default="crun,runc,docker")
    args = parser.parse_args()
    drivers = [d for d in args.drivers.split(",") if d]

    print(f"sandbox latency on {os.cpu_count()} cores; embedded dsec server and dsec's Docker Engine", flush=True)
    engine = docker.DockerClient(base_url=ensure_engine(), version="auto", timeout=120)
    client = dsec.Client()
    try:
        tag = docker_tag_of(IMAGE, engine)
        create = bench_create(client, drivers, args.n)
        execs = bench_exec(client, drivers, args.exec_n)
        docker_run, docker_exec = bench_docker(engine, tag, args.n, args.exec_n)
        functions = bench_function(client, args.exec_n)
    finally:
        client.close()
        engine.close()

    main_driver = next((d for d in drivers if d in create and d in execs), None)
    pairs: dict[str, str] = {}
    if main_driver is not None:
        pairs["driver"] = main_driver
        pairs["container_vs_docker_run"] = f"{docker_run['p50'] / create[main_driver]['p50']:.1f}"
        pairs["exec_vs_docker_exec"] = f"{docker_exec['p50'] / execs[main_driver]['p50']:.1f}"
    if functions is not None:
        function, subprocess_python = functions
        pairs["function_vs_subprocess"] = f"{subprocess_python['p50'] / function['p50']:.1f}"
        pairs["call_p50_ms"] = f"{function['p50']:.2f}"
        pairs["call_p99_ms"] = f"{function['p99']:.2f}"
        pairs["python_subprocess_p50_ms"] = f"{subprocess_python['p50']:.1f}"
    for driver, r in create.items():
        pairs[f"create_{driver}_p50_ms"] = f"{r['p50']:.1f}"
        pairs[f"create_{driver}_p99_ms"] = f"{r['p99']:.1f}"
    for driver, r in execs.items():
        pairs[f"exec_{driver}_p50_ms"] = f"{r['p50']:.2f}"
    pairs["docker_run_p50_ms"] = f"{docker_run['p50']:.1f}"
    pairs["docker_run_p99_ms"] = f"{docker_run['p99']:.1f}"
    pairs["docker_exec_p50_ms"] = f"{docker_exec['p50']:.1f}"
    print(" ".join(f"{k}={v}" for k, v in pairs.items()), flush=True)
    return 0 if main_driver is not None and functions is not None else 1


if __name__ == "__main__":
    sys.exit(main())
