"""Base images: busybox built from scratch into a fresh store; python (built by setup) runs python 3.11."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dsec.config import ServerConfig
from dsec.images.base_images import build_busybox
from dsec.images.store import LayerStore
from dsec.substrates.base import ImageRootfs


@contextmanager
def mounted(rootfs: ImageRootfs, tmp_path: Path) -> Iterator[Path]:
    upper, work, merged = (tmp_path / n for n in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        d.mkdir()
    lower = ":".join(str(p) for p in rootfs.lower_dirs)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
                    str(merged)], check=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=True)


@pytest.mark.timeout(120)
def test_busybox_builds_runs_and_rebuild_is_a_noop(store: LayerStore, tmp_path: Path) -> None:
    record = build_busybox(store)
    assert record.tags == ["busybox"] and len(record.layers) == 1
    assert any(e.startswith("PATH=") for e in record.config.env) and record.config.cmd == ["sh"]
    started = time.monotonic()
    assert build_busybox(store).digest == record.digest
    assert time.monotonic() - started < 1.0
    with mounted(store.resolve("busybox"), tmp_path) as root:
        out = subprocess.run(["/usr/sbin/chroot", str(root), "sh", "-c", "echo $((6*7)); id -un; ls -d /tmp"],
                             capture_output=True, text=True, check=True, env={"PATH": "/bin:/usr/bin"})
        assert out.stdout.split() == ["42", "root", "/tmp"]
        assert os.stat(root / "tmp").st_mode & 0o1777 == 0o1777


@pytest.mark.timeout(120)
def test_python_base_image_has_two_layers_and_python_311(tmp_path: Path) -> None:
    store = LayerStore(ServerConfig().images_dir)  # built by infra/setup.d/40-images.sh
    try:
        record = store.inspect("python")
        assert len(record.layers) == 2 and record.config.cmd == ["python3"]
        with mounted(store.resolve("python"), tmp_path) as root:
            code = "import sys, json, resource, dataclasses, socket; print(sys.version_info[:2])"
            out = subprocess.run(["/usr/sbin/chroot", str(root), "python3", "-c", code], capture_output=True, text=True,
                                 env={"PATH": "/usr/bin:/bin"})
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == "(3, 11)"
    finally:
        store.close()
