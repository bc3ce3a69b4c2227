"""Benchmark the layered image cache; the last line is `key=value` pairs.

create_2g_over_10m          warm sandbox create time, 2 GB image / 10 MB image (target <= 1.2)
cold_import_vs_docker_load  `docker load` time / our cold import time of the same ~300 MB docker-save tar
disk_per_extra_sandbox_mb   disk used per extra running sandbox of the same image (target ~ 0)
concurrent_cold_pull_downloads  registry layer downloads for 50 concurrent creates on a cold node (target = layers)

Layer formats (dir = extracted directories, erofs = loop-mounted erofs images), same run, the python base image:
prep_s_<fmt>          cold import of its docker-save tar (extract, or extract + mkfs.erofs)
cold_create_ms_<fmt>  acquire + create when no sandbox uses the image (erofs: includes the loop mounts)
warm_create_ms_<fmt>  acquire + create while another sandbox holds it
find_ms_<fmt>, py_import_ms_<fmt>  `find / -xdev | wc -l` and `python3 -c 'import json,email,http.client'` (medians)
layers_mb_<fmt>       disk used by the layers (du, allocated blocks)

Everything runs in a temporary store and temporary registry; sizes: DSEC_BENCH_BIG_MB (default 2048).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dsec.config import ServerConfig
from dsec.images import registry as reg
from dsec.images.export import export_docker_archive
from dsec.images.layout import write_layout
from dsec.images.store import LayerStore
from dsec.models import SandboxSpec
from dsec.server.drivers import DriverRegistry
from dsec.substrates.base import Exited
from dsec.substrates.container.dockerd import ensure_engine

from bench.harness import percentile, report
from tests.support.ports import free_port

BIG_MB = int(os.environ.get("DSEC_BENCH_BIG_MB", "2048"))


def _image(store: LayerStore, work: Path, tag: str, total_mb: int, files: int) -> None:
    """An image of busybox plus one layer of `files` random-content files totalling `total_mb`."""
    root = work / f"{tag}-tree"
    root.mkdir()
    per = max(1, total_mb * (1 << 20) // files)
    chunk = os.urandom(1 << 20)
    for i in range(files):
        with open(root / f"f{i}", "wb") as fh:
            left = per
            while left > 0:
                fh.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
    base = store.inspect("busybox")
    tar = work / f"{tag}.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
    shutil.rmtree(root)
    busybox_tar = work / f"{tag}-busybox.tar"
    shutil.copyfile(store.blob_path(base.layers[0].blob_digest), busybox_tar)
    layout = write_layout(work / f"{tag}-oci", [busybox_tar, tar], {"Env": ["PATH=/bin:/usr/bin"], "Cmd": ["sh"]}, tag)
    store.import_oci_layout(layout, tag=tag)
    shutil.rmtree(layout)


def _create_time(store: LayerStore, driver, tag: str, run_root: Path, repeats: int = 5) -> float:
    rootfs = store.resolve(tag)
    times = []
    for _ in range(repeats):
        sandbox_id = f"bench-{uuid.uuid4().hex[:10]}"
        state = run_root / sandbox_id
        state.mkdir()
        started = time.perf_counter()
        sandbox = driver.create(sandbox_id, SandboxSpec(image=tag, driver="crun"), rootfs, state)
        times.append(time.perf_counter() - started)
        driver.destroy(sandbox)
        driver.cleanup_state_dir(state)
        shutil.rmtree(state, ignore_errors=True)
    return sorted(times)[len(times) // 2]


def _du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sx", "--block-size=1", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def bench_create_and_disk(store: LayerStore, work: Path) -> dict[str, float]:
    driver = DriverRegistry(ServerConfig()).get("crun")
    run_root = work / "run"
    run_root.mkdir()
    _image(store, work, "small", 10, 10)
    _image(store, work, "big", BIG_MB, max(1, BIG_MB // 64))
    small = _create_time(store, driver, "small", run_root)
    big = _create_time(store, driver, "big", run_root)
    print(f"warm create: 10 MB image {small * 1000:.0f} ms, {BIG_MB} MB image {big * 1000:.0f} ms")
    sandboxes = []
    rootfs = store.resolve("big")
    before = _du_bytes(store.root) + _du_bytes(run_root)
    try:
        for _ in range(5):
            sandbox_id = f"bench-{uuid.uuid4().hex[:10]}"
            state = run_root / sandbox_id
            state.mkdir()
            sandboxes.append((driver.create(sandbox_id, SandboxSpec(image="big", driver="crun"), rootfs, state), state))
        per_sandbox = (_du_bytes(store.root) + _du_bytes(run_root) - before) / len(sandboxes) / 1e6
    finally:
        for sandbox, state in sandboxes:
            driver.destroy(sandbox)
            driver.cleanup_state_dir(state)
    print(f"disk per extra sandbox of the {BIG_MB} MB image: {per_sandbox:.2f} MB")
    return {"create_2g_over_10m": round(big / small, 2), "disk_per_extra_sandbox_mb": round(per_sandbox, 2)}


def bench_import_vs_docker(store: LayerStore, work: Path, rounds: int = 3) -> float:
    """Median over `rounds` of (docker load, our cold import) of the same tar, taken in turns so that load from
    other work on the machine hits both alike; each import starts from synced, empty state."""
    _image(store, work, "mid", 300, 30)
    tag = f"dsec-bench-{uuid.uuid4().hex[:8]}:v1"
    archive = export_docker_archive(store, "mid", work / "mid.tar", repo_tags=[tag])
    docker = ["docker", "-H", ensure_engine(use_docker_host=False)]
    ours, theirs = [], []
    for i in range(rounds):
        cold = LayerStore(work / f"cold-import-{i}", "dir")
        os.sync()  # earlier dirty pages must not be written back inside either timed import
        started = time.perf_counter()
        cold.import_docker_archive(archive)
        ours.append(time.perf_counter() - started)
        cold.close()
        shutil.rmtree(work / f"cold-import-{i}")
        os.sync()
        started = time.perf_counter()
        subprocess.run([*docker, "load", "-q", "-i", str(archive)], check=True, capture_output=True)
        theirs.append(time.perf_counter() - started)
        subprocess.run([*docker, "rmi", "-f", tag], capture_output=True)
    print(f"cold import of a 300 MB docker-save tar (median of {rounds}): ours {percentile(ours, 0.5):.2f}s "
          f"{[round(x, 2) for x in ours]}, docker load {percentile(theirs, 0.5):.2f}s {[round(x, 2) for x in theirs]}")
    return round(percentile(theirs, 0.5) / percentile(ours, 0.5), 2)


def bench_concurrent_pull(store: LayerStore, work: Path) -> int:
    port = free_port()
    config = work / "registry.yml"
    log = work / "registry.log"
    config.write_text(f"version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {work / 'reg'}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")
    with open(log, "wb") as out:
        proc = subprocess.Popen(["/usr/bin/docker-registry", "serve", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        ref = f"127.0.0.1:{port}/bench/small:v1"
        for _ in range(100):
            try:
                reg.push(store, "small", ref)
                break
            except Exception:  # noqa: BLE001 - registry still starting
                time.sleep(0.1)
        cold = LayerStore(work / "cold-pull")
        record = reg.pull(cold, ref)
        with ThreadPoolExecutor(max_workers=50) as pool:
            list(pool.map(lambda i: cold.acquire(ref, f"sb-{i}"), range(50)))
        time.sleep(0.5)
        text = log.read_text(errors="replace")
        downloads = sum(text.count(f"/blobs/{layer.blob_digest} HTTP/1.1\" 200") for layer in record.layers)
        print(f"50 concurrent creates on a cold node: {downloads} layer downloads for {len(record.layers)} layers")
        cold.close()
        return downloads
    finally:
        proc.kill()
        proc.wait()


def _exec_s(sandbox, command: str) -> float:
    started = time.perf_counter()
    code = None
    for event in sandbox.spawn(["sh", "-c", command], {"PATH": "/usr/bin:/bin"}, "/").events():
        if isinstance(event, Exited):
            code = event.exit_code
    if code != 0:
        raise RuntimeError(f"bench command {command!r} exited {code}")
    return time.perf_counter() - started


class _FormatStore:
    """One store of one layer format plus the sandboxes the benchmark made in it."""

    def __init__(self, work: Path, fmt: str, driver) -> None:
        self.fmt = fmt
        self.store = LayerStore(work / f"fmt-{fmt}", fmt)
        self.driver = driver
        self.made: list[tuple[object, Path, str]] = []

    def create(self) -> float:
        """acquire + create of one sandbox of the python image; seconds."""
        holder = f"bench-{uuid.uuid4().hex[:10]}"
        state = self.store.new_tmp("-bench")
        state.mkdir()
        started = time.perf_counter()
        rootfs = self.store.acquire("python", holder)
        self.made.append((self.driver.create(holder, SandboxSpec(image="python", driver="crun"), rootfs, state), state, holder))
        return time.perf_counter() - started

    def destroy_all(self) -> None:
        while self.made:
            sandbox, state, holder = self.made.pop()
            self.driver.destroy(sandbox)
            self.driver.cleanup_state_dir(state)
            self.store.release(holder)  # the last release of an erofs layer unmounts it: next create is cold

    def close(self) -> None:
        self.destroy_all()
        self.store.close()


def bench_layer_formats(work: Path, rounds: int = 5) -> dict[str, float]:
    """The python base image in a fresh store per layer format: prep, cold/warm create, file-heavy execs, disk.

    Measurements alternate between the formats round by round, so load from other work on the machine hits both
    alike; each figure is the median of `rounds`.
    """
    from dsec.images.base_images import build_python

    home = LayerStore(ServerConfig().images_dir)
    if "python" not in home.tags():
        build_python(home)
    archive = export_docker_archive(home, "python", work / "python.tar")
    home.close()
    driver = DriverRegistry(ServerConfig()).get("crun")
    stores = [_FormatStore(work, fmt, driver) for fmt in ("dir", "erofs")]
    samples: dict[str, list[float]] = {}

    def sample(key: str, fmt: str, seconds: float) -> None:
        samples.setdefault(f"{key}_{fmt}", []).append(seconds * 1000)

    try:
        results: dict[str, float] = {}
        for fs in stores:
            os.sync()
            started = time.perf_counter()
            fs.store.import_docker_archive(archive, tag="python")
            results[f"prep_s_{fs.fmt}"] = round(time.perf_counter() - started, 2)
            results[f"layers_mb_{fs.fmt}"] = round(_du_bytes(fs.store.layers_dir) / 1e6, 1)
        for _ in range(rounds):
            for fs in stores:
                sample("cold_create_ms", fs.fmt, fs.create())
                fs.destroy_all()
        for fs in stores:
            fs.create()  # held for the rest: later creates find the layers mounted
        for _ in range(rounds):
            for fs in stores:
                sample("warm_create_ms", fs.fmt, fs.create())
                first = fs.made[0][0]
                sample("find_ms", fs.fmt, _exec_s(first, "find / -xdev | wc -l >/dev/null"))
                sample("py_import_ms", fs.fmt, _exec_s(first, "python3 -c 'import json,email,http.client'"))
        for key, values in samples.items():
            results[key] = round(percentile(values, 0.5), 1)
    finally:
        for fs in stores:
            fs.close()
    for fs in stores:
        print(f"layer format {fs.fmt}: " + ", ".join(f"{k}={v}" for k, v in results.items() if k.endswith(fs.fmt)))
    return results


def _import_only(work: Path) -> float:
    from dsec.images.base_images import build_busybox

    store = LayerStore(work / "images", "dir")
    try:
        build_busybox(store)
        return bench_import_vs_docker(store, work)
    finally:
        store.close()


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="dsec-bench-images-", dir=ServerConfig().home))
    only = {"--formats": bench_layer_formats, "--import": lambda w: {"cold_import_vs_docker_load": _import_only(w)}}
    picked = [only[a] for a in sys.argv[1:] if a in only]
    try:
        if picked:
            results = {}
            for section in picked:
                results.update(section(work))
            report(results)
            return 0
        store = LayerStore(work / "images", "dir")
        from dsec.images.base_images import build_busybox

        build_busybox(store)
        results: dict[str, float] = {}
        results.update(bench_create_and_disk(store, work))
        results["cold_import_vs_docker_load"] = bench_import_vs_docker(store, work)
        results["concurrent_cold_pull_downloads"] = bench_concurrent_pull(store, work)
        store.close()
        results.update(bench_layer_formats(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
