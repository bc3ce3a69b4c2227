"""Sandbox latency: dsec against the tools people would otherwise use, on the same machine and the same engine.

Three comparisons, each a speed-up factor (peer p50 / dsec p50; > 1 means dsec is faster):
  container_vs_docker_run   create + exec `true` + destroy of a busybox container through the dsec SDK
                            (driver crun, the default) against `docker run --rm IMAGE true` of the same image on
                            dsec's own Docker Engine (docker SDK, so no CLI start-up is charged to Docker).
                            The peer runs at Docker's default, without a user namespace (`--userns=host`, as
                            DOCKER_PEER): dsec's engine remaps its own sandboxes' ids (docs/hardening.md), and a
                            peer that paid for that too would flatter dsec. Same for `docker exec`'s container.
                            dsec's destroy returns once the sandbox is killed, its unmounts and file removal
                            finishing on a server thread (docs/lifecycle.md); `remove=True` returns once the
                            engine has removed the container. Neither side's leftover work lands in the next
                            sample (each starts quiet, below).
  exec_vs_docker_exec       one exec round trip (`true`) in a running sandbox through the SDK (`sb.exec`, which sends
                            ExecCollect: one reply) against `docker exec` (exec_create + exec_start + exec_inspect)
                            in a running container of the same image; both check the exit code. Each call follows
                            the other side's (~30 ms of Docker's Go daemons and runc have just run, so a dsec exec
                            starts with cold caches; that costs it ~1 ms, Docker's far longer path 1-2 ms).
  exec_vs_docker_exec_steady  the same on the first driver, each side timed in runs of EXEC_RUN calls after one
                            untimed call (bench.harness.interleaved's `run`): each call follows its own side's, as
                            in a loop of execs. Reported beside the figure above, not instead of it.
  function_vs_subprocess    a warm `sb.call(fn)` in a function sandbox against `python3 -c` in a subprocess.
Two warm-pool figures (docs/lifecycle.md), on the first driver, in the same run:
  pool_create_p50_ms        create + first exec `true` of a sandbox claimed from a warm pool (the pool is
                            refilled between samples, outside the timing; every sample must be a claim).
  burst_100_creates_p99_s   100 creates sent at once (one thread each) with a pool of 20 ready: the p99 of the
                            time each create took to return (80 go cold through admission control).
The cost of user namespaces (issue #22, docs/hardening.md), on the first driver when it is crun or runc:
  userns_create_overhead_ms create + first exec `true` at the driver (busybox from the layer store), p50 with a
                            user namespace minus p50 without, interleaved in the same run (destroys untimed).
What the host makes both sides pay, measured first:
  cgroup_migrate_p50_ms     moving a process into a new cgroup, the write every container start and `docker exec`
                            makes: ~0.2 ms with cgroup2 favordynmods (make setup), 5-15 ms where it waits for RCU.
Every driver (crun, runc, docker) is measured and reported. Contenders of one comparison run interleaved, one
sample each per round, so load from other work on the machine hits all of them alike, and each sample starts once
the machine is quiet (bench/quiet.py), so no side is charged with the work another left running after its call
returned (Docker's daemons after `docker exec`, dsec's teardown after a destroy). The last line is key=value pairs.

Usage: .venv/bin/python -m bench.sandbox_latency [--n 40] [--exec-n 200] [--drivers crun,runc,docker] [--only create,burst]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker

import dsec
from dsec.config import ServerConfig
from dsec.images.store import LayerStore
from dsec.pids import pid_alive
from dsec.substrates.container.bench import userns_create_ms
from dsec.substrates.container.docker_images import ensure_image
from dsec.substrates.container import cgroup_tuning
from dsec.substrates.container.dockerd import ensure_engine

from bench.harness import Stats, interleaved, percentile, report
from bench.quiet import wait_quiet

IMAGE = "busybox"
EXEC_RUN = 4  # timed calls in a row per side for exec_vs_docker_exec_steady (after one untimed call)
FUNCTION_IMAGE = "python"


# Docker's defaults for the peer's containers: no network, and the host's user namespace (what a daemon without
# --userns-remap gives every container) on dsec's remapping engine, so the peer pays for no remap.
DOCKER_PEER = {"network_mode": "none", "userns_mode": "host"}


def docker_tag_of(image: str, engine: docker.DockerClient) -> str:
    """The engine's tag for a layer-store image: the very same root the dsec docker driver runs."""
    store = LayerStore(ServerConfig().images_dir)
    try:
        return ensure_image(engine, store.resolve(image))
    finally:
        store.close()


def working_drivers(client: dsec.Client, drivers: list[str]) -> list[str]:
    """The drivers that can create a sandbox here; the others are reported and left out."""
    ok = []
    for driver in drivers:
        try:
            client.create(IMAGE, "container", driver=driver).destroy()
            ok.append(driver)
        except dsec.DsecError as exc:
            print(f"dsec driver {driver} failed, left out: {exc}", flush=True)
    return ok


def bench_create(client: dsec.Client, engine: docker.DockerClient, tag: str, drivers: list[str], n: int) -> dict[str, Stats]:
    def dsec_once(driver: str) -> None:
        sb = client.create(IMAGE, "container", driver=driver)
        try:
            sb.exec(["true"])
        finally:
            sb.destroy()

    contenders: dict[str, Callable[[], object]] = {d: (lambda d=d: dsec_once(d)) for d in drivers}
    contenders["docker run --rm"] = lambda: engine.containers.run(tag, ["true"], remove=True, **DOCKER_PEER)
    return interleaved("create + exec true + destroy", contenders, n)


@contextlib.contextmanager
def running(client: dsec.Client, engine: docker.DockerClient, tag: str, drivers: list[str]) -> Iterator[tuple[dict, object]]:
    """One running dsec sandbox per driver and one running Docker container; all removed afterwards."""
    sandboxes: dict[str, dsec.Sandbox] = {}
    container = None
    try:
        for driver in drivers:
            sandboxes[driver] = client.create(IMAGE, "container", driver=driver)
        container = engine.containers.run(tag, ["sleep", "3600"], detach=True, remove=True, **DOCKER_PEER)
        yield sandboxes, container
    finally:
        for sb in sandboxes.values():
            sb.destroy()
        if container is not None:
            container.remove(force=True)


def bench_exec(client: dsec.Client, engine: docker.DockerClient, tag: str, drivers: list[str], n: int) -> dict[str, Stats]:
    api = engine.api
    with running(client, engine, tag, drivers) as (sandboxes, container):

        def docker_exec() -> None:
            exec_id = api.exec_create(container.id, ["true"])["Id"]
            api.exec_start(exec_id)
            if api.exec_inspect(exec_id)["ExitCode"] != 0:
                raise RuntimeError("docker exec of `true` failed")

        def dsec_exec(sb: dsec.Sandbox) -> None:
            if sb.exec(["true"]).exit_code != 0:
                raise RuntimeError(f"dsec exec of `true` failed in {sb.id}")

        contenders: dict[str, Callable[[], object]] = {d: (lambda sb=sb: dsec_exec(sb)) for d, sb in sandboxes.items()}
        contenders["docker exec"] = docker_exec
        stats = interleaved("exec round trip", contenders, n, warmup=5)
        if not drivers:
            return stats
        steady = interleaved(f"exec round trip, runs of {EXEC_RUN} (each call after its own side's)",
                             {label: contenders[label] for label in (drivers[0], "docker exec")}, n, run=EXEC_RUN)
        return {**stats, **{f"{label} (steady)": v for label, v in steady.items()}}


MIGRATE_GROUP_PREFIX = "dsec-bench-migrate-"  # + the bench's pid + the sample: one cgroup per sample


def _remove_dead_runs_groups(root: Path) -> None:
    """The probe cgroups of a run that was killed mid-sample (its pid is gone): their `sleep` killed, removed."""
    for group in root.glob(f"{MIGRATE_GROUP_PREFIX}*-*"):
        pid = group.name.removeprefix(MIGRATE_GROUP_PREFIX).split("-")[0]
        if not pid.isdigit() or pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            for member in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(member), signal.SIGKILL)
        _remove_group(group)


def _remove_group(group: Path) -> None:
    """rmdir a probe cgroup: it is empty once its only process is reaped, which v2 may show a moment late."""
    for _ in range(100):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)


def cgroup_migrate_p50_ms(samples: int = 9) -> float | None:
    """p50 of moving a sleeping process into a new cgroup: the write every container start (dsec's and Docker's)
    and every `docker exec` makes, so both sides' figures below depend on it. Where the kernel makes it wait for
    an RCU grace period (no cgroup2 favordynmods: infra/setup.d/30-container.sh) it is 5-15 ms, else ~0.2 ms."""
    root = Path("/sys/fs/cgroup/pids")  # cgroup v1 (and hybrid) hosts; a cgroup2-only host has its root here:
    if not (root / "cgroup.procs").exists():
        root = Path("/sys/fs/cgroup")
    if not (root / "cgroup.procs").exists():
        return None
    _remove_dead_runs_groups(root)
    times: list[float] = []
    for i in range(samples):
        child = subprocess.Popen(["sleep", "60"])
        group = root / f"{MIGRATE_GROUP_PREFIX}{os.getpid()}-{i}"
        group.mkdir()
        try:
            wait_quiet()
            started = time.perf_counter()
            (group / "cgroup.procs").write_text(str(child.pid))
            times.append((time.perf_counter() - started) * 1000)
        finally:
            child.kill()
            child.wait()
            _remove_group(group)
    p50 = percentile(times, 0.5)
    print(f"  cgroup migration (a pid into a new cgroup, {root}): p50 {p50:.2f} ms, cgroup2 favordynmods flag "
          f"{cgroup_tuning.state()} (n={samples})", flush=True)
    return p50


def square(x: int) -> int:
    return x * x


def bench_function(client: dsec.Client, n: int) -> dict[str, Stats] | None:
    try:
        sb = client.create(FUNCTION_IMAGE, "function")
    except dsec.DsecError as exc:
        print(f"function sandbox failed, left out: {exc}", flush=True)
        return None
    python = shutil.which("python3") or sys.executable
    try:
        contenders: dict[str, Callable[[], object]] = {
            "call": lambda: sb.call(square, 7),
            "python3 -c": lambda: subprocess.run([python, "-c", "print(7 * 7)"], check=True, capture_output=True),
        }
        return interleaved("warm function call", contenders, n, warmup=5)
    finally:
        sb.destroy()


def _wait_pool(client: dsec.Client, ready: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pool = client.pools.get(IMAGE)
        if pool is not None and pool.ready >= ready:
            return
        if pool is not None and pool.last_error:
            raise RuntimeError(f"warm pool refill failed: {pool.last_error}")
        time.sleep(0.02)
    raise RuntimeError(f"warm pool of {IMAGE} not at {ready} ready after {timeout_s:.0f}s")


def bench_pool_create(client: dsec.Client, driver: str, n: int) -> Stats:
    """Claim + first exec from a pool of 2; the refill of the claimed one happens outside the timed part."""
    print("== warm pool: create (claim) + first exec true", flush=True)
    client.pools.resize(IMAGE, 2, driver=driver)
    samples: list[float] = []
    try:
        for _ in range(n):
            _wait_pool(client, 2)
            started = time.perf_counter()
            sb = client.create(IMAGE, "container", driver=driver)
            sb.exec(["true"])
            samples.append((time.perf_counter() - started) * 1000)
            if "pool_claim" not in sb.info.timings_ms:
                raise RuntimeError("a create that should have been a warm-pool claim went cold")
            sb.destroy()
    finally:
        client.pools.resize(IMAGE, 0, driver=driver)
    stats = {"p50": percentile(samples, 0.5), "p99": percentile(samples, 0.99)}
    print(f"  pool claim + exec                p50 {stats['p50']:8.2f} ms   p99 {stats['p99']:8.2f} ms   (n={n})", flush=True)
    return stats


def bench_burst(client: dsec.Client, driver: str, creates: int, pool_size: int) -> dict[str, float]:
    """`creates` creates released at once by a barrier, with `pool_size` sandboxes ready in a warm pool."""
    print(f"== burst: {creates} creates at once, warm pool of {pool_size}", flush=True)
    client.pools.resize(IMAGE, pool_size, driver=driver)
    _wait_pool(client, pool_size)
    barrier = threading.Barrier(creates)
    seconds: list[float] = [0.0] * creates
    made: list[dsec.Sandbox | None] = [None] * creates
    errors: list[str] = []

    def one(index: int) -> None:
        barrier.wait()
        started = time.perf_counter()
        try:
            made[index] = client.create(IMAGE, "container", driver=driver)
        except dsec.DsecError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        seconds[index] = time.perf_counter() - started

    threads = [threading.Thread(target=one, args=(i,)) for i in range(creates)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        client.pools.resize(IMAGE, 0, driver=driver)
        for sb in made:
            if sb is not None:
                sb.destroy()
    if errors:
        raise RuntimeError(f"{len(errors)} of {creates} burst creates failed, e.g. {errors[0]}")
    claimed = sum(1 for sb in made if sb is not None and "pool_claim" in sb.info.timings_ms)
    result = {"p50": percentile(seconds, 0.5), "p99": percentile(seconds, 0.99), "claimed": claimed}
    print(f"  burst create                     p50 {result['p50']:8.3f} s    p99 {result['p99']:8.3f} s    "
          f"({claimed} served from the pool)", flush=True)
    return result


PARTS = ("create", "exec", "function", "pool", "burst", "pause", "userns")
"""What `--only` may name: each figure group of the docstring."""

PAUSE_CASES = (("crun", "freeze"), ("crun", "files"), ("runc", "freeze"), ("runc", "memory"),
               ("microvm", "freeze"), ("microvm", "memory"), ("vm", "memory"))
"""(container driver or VM substrate, pause kind): runc is the container runtime with CRIU (crun 1.8.1 lacks it)."""
PAUSE_ARG = {"freeze": None, "files": False, "memory": True}


def bench_pause(client: dsec.Client, n: int) -> dict[str, str]:
    """pause + resume of a sandbox running one small background process, per substrate and pause kind, timed
    interleaved; a kind the host refuses (a memory pause without a working CRIU) reports `unsupported`."""
    made: list[dsec.Sandbox] = []
    contenders: dict[str, Callable[[], object]] = {}
    refused: dict[str, str] = {}
    try:
        for where, kind in PAUSE_CASES:
            substrate, driver = ("container", where) if where in ("crun", "runc") else (where, "")
            sb = client.create(IMAGE, substrate, driver=driver, memory_mb=256)
            made.append(sb)
            sb.exec("setsid sleep 100000 </dev/null >/dev/null 2>&1 &")

            def once(sb: dsec.Sandbox = sb, memory: bool | None = PAUSE_ARG[kind]) -> None:
                sb.pause(memory=memory)
                sb.resume()

            try:
                once()
            except dsec.Unsupported as exc:
                refused[f"{where}_{kind}"] = str(exc)
                continue
            contenders[f"{where}_{kind}"] = once
        results = interleaved("pause + resume (one background process)", contenders, n, warmup=1)
    finally:
        for sb in made:
            with contextlib.suppress(dsec.DsecError):
                sb.destroy()
    pairs = {}
    for where, kind in PAUSE_CASES:
        label = f"{where}_{kind}"
        pairs[f"pause_resume_{kind}_ms_{where}"] = f"{results[label]['p50']:.1f}" if label in results else "unsupported"
    for where in ("runc", "microvm"):
        if f"{where}_memory" in results and f"{where}_freeze" in results:
            pairs[f"{where}_memory_vs_freeze"] = f"{results[f'{where}_memory']['p50'] / results[f'{where}_freeze']['p50']:.1f}"
    for label, reason in refused.items():
        print(f"  {label}: refused: {reason}", flush=True)
    return pairs


def bench_userns(driver: str, n: int) -> dict[str, str]:
    """What a user namespace (issue #22) costs a create: create + first exec `true` at the driver, with and
    without one, interleaved, on the layer store's busybox in a private home (destroys untimed)."""
    if driver not in ("crun", "runc"):
        return {}
    config = ServerConfig()
    store = LayerStore(config.images_dir, config.layer_format)
    home = Path(tempfile.mkdtemp(prefix="dsec-userns-bench-"))
    holder = f"userns-bench-{os.getpid()}"
    try:
        samples = userns_create_ms(driver, store.acquire(IMAGE, holder), home, n)
    finally:
        store.release(holder)
        store.close()
        shutil.rmtree(home, ignore_errors=True)
    p50 = {label: percentile(xs, 0.5) for label, xs in samples.items()}
    print(f"  {driver} create + exec, user namespace    p50 {p50['userns']:8.2f} ms   without {p50['no_userns']:8.2f} ms"
          f"   (n={n} each, interleaved)", flush=True)
    return {
        "userns_create_overhead_ms": f"{p50['userns'] - p50['no_userns']:.1f}",
        f"create_userns_{driver}_p50_ms": f"{p50['userns']:.1f}",
        f"create_no_userns_{driver}_p50_ms": f"{p50['no_userns']:.1f}",
    }


def summary(drivers: list[str], create: dict[str, Stats] | None, execs: dict[str, Stats] | None,
            functions: dict[str, Stats] | None, pool: Stats | None = None,
            burst: dict[str, float] | None = None) -> dict[str, str]:
    """The key=value figures of what was measured (a part left out by --only has none)."""
    pairs: dict[str, str] = {}
    if drivers:
        main = drivers[0]
        pairs["driver"] = main
        if create is not None:
            pairs["container_vs_docker_run"] = f"{create['docker run --rm']['p50'] / create[main]['p50']:.1f}"
        if execs is not None:
            pairs["exec_vs_docker_exec"] = f"{execs['docker exec']['p50'] / execs[main]['p50']:.1f}"
            pairs["exec_vs_docker_exec_steady"] = (
                f"{execs['docker exec (steady)']['p50'] / execs[f'{main} (steady)']['p50']:.1f}")
    if functions is not None:
        pairs["function_vs_subprocess"] = f"{functions['python3 -c']['p50'] / functions['call']['p50']:.1f}"
    for driver in drivers:
        if create is not None:
            pairs[f"create_{driver}_p50_ms"] = f"{create[driver]['p50']:.1f}"
            pairs[f"create_{driver}_p99_ms"] = f"{create[driver]['p99']:.1f}"
        if execs is not None:
            pairs[f"exec_{driver}_p50_ms"] = f"{execs[driver]['p50']:.2f}"
            pairs[f"exec_{driver}_p99_ms"] = f"{execs[driver]['p99']:.2f}"
    if drivers and create is not None:
        pairs["docker_run_p50_ms"] = f"{create['docker run --rm']['p50']:.1f}"
        pairs["docker_run_p99_ms"] = f"{create['docker run --rm']['p99']:.1f}"
    if drivers and execs is not None:
        pairs["docker_exec_p50_ms"] = f"{execs['docker exec']['p50']:.1f}"
        pairs["docker_exec_p99_ms"] = f"{execs['docker exec']['p99']:.1f}"
        pairs[f"exec_{drivers[0]}_steady_p50_ms"] = f"{execs[f'{drivers[0]} (steady)']['p50']:.2f}"
        pairs["docker_exec_steady_p50_ms"] = f"{execs['docker exec (steady)']['p50']:.1f}"
    if functions is not None:
        pairs["call_p50_ms"] = f"{functions['call']['p50']:.2f}"
        pairs["call_p99_ms"] = f"{functions['call']['p99']:.2f}"
        pairs["python_subprocess_p50_ms"] = f"{functions['python3 -c']['p50']:.1f}"
    if pool is not None:
        pairs["pool_create_p50_ms"] = f"{pool['p50']:.2f}"
        pairs["pool_create_p99_ms"] = f"{pool['p99']:.2f}"
    if burst is not None:
        pairs["burst_100_creates_p99_s"] = f"{burst['p99']:.2f}"
        pairs["burst_100_creates_p50_s"] = f"{burst['p50']:.2f}"
        pairs["burst_pool_claims"] = str(int(burst["claimed"]))
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40, help="rounds of create / docker run")
    parser.add_argument("--exec-n", type=int, default=200, help="rounds of exec / call")
    parser.add_argument("--drivers", default="crun,runc,docker", help="the first one is the one compared")
    parser.add_argument("--burst", type=int, default=100, help="creates sent at once in the burst figure")
    parser.add_argument("--burst-pool", type=int, default=20, help="warm pool size during the burst")
    parser.add_argument("--pause-n", type=int, default=10, help="rounds of pause + resume per substrate and kind")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to measure (default all): {', '.join(PARTS)}")
    args = parser.parse_args()
    parts = {p for p in args.only.split(",") if p}
    if parts - set(PARTS):
        parser.error(f"--only: unknown part(s) {', '.join(sorted(parts - set(PARTS)))}; choose from {', '.join(PARTS)}")

    print(f"sandbox latency on {os.cpu_count()} cores; embedded dsec server and dsec's Docker Engine", flush=True)
    migrate_ms = cgroup_migrate_p50_ms()
    engine = docker.DockerClient(base_url=ensure_engine(), version="auto", timeout=120)
    client = dsec.Client()
    try:
        tag = docker_tag_of(IMAGE, engine)
        drivers = working_drivers(client, [d for d in args.drivers.split(",") if d])
        create = bench_create(client, engine, tag, drivers, args.n) if "create" in parts else None
        execs = bench_exec(client, engine, tag, drivers, args.exec_n) if "exec" in parts else None
        functions = bench_function(client, args.exec_n) if "function" in parts else None
        pool = bench_pool_create(client, drivers[0], args.n) if drivers and "pool" in parts else None
        burst = bench_burst(client, drivers[0], args.burst, args.burst_pool) if drivers and "burst" in parts else None
        pauses = bench_pause(client, args.pause_n) if "pause" in parts else {}
        userns = bench_userns(drivers[0], args.n) if drivers and "userns" in parts else {}
    finally:
        client.close()
        engine.close()
    report(summary(drivers, create, execs, functions, pool, burst) | pauses | userns
           | ({} if migrate_ms is None else {"cgroup_migrate_p50_ms": f"{migrate_ms:.2f}"}))
    return 0 if drivers and (functions is not None or "function" not in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
