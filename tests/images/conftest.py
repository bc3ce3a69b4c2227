"""Fixtures for the image tests: a fresh store per test (temp dir, real filesystem) and a real registry."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dsec.images.store import LayerStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LayerStore]:
    s = LayerStore(tmp_path / "images", "dir")
    try:
        yield s
    finally:
        s.close()


def mounts_under(root: Path) -> list[str]:
    """Lines of /proc/mounts whose mount point lies under `root` (what a leak check looks for)."""
    with open("/proc/mounts") as fh:
        return [line for line in fh if line.split(" ")[1].startswith(str(root))]


@pytest.fixture(params=["dir", "erofs"])
def fmt_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LayerStore]:
    """A store in each layer format; afterwards no mount of it may remain (held or not)."""
    root = tmp_path / "images"
    s = LayerStore(root, request.param)
    try:
        yield s
    finally:
        s.unmount_unused(keep=set())
        s.close()
        assert mounts_under(root) == []


@dataclass
class Registry:
    """A real OCI distribution registry (Debian docker-registry) on loopback, with its access log."""

    host: str
    log: Path

    def blob_gets(self, digest: str) -> int:
        """How many times the registry served `digest` (its own access log: the ground truth for downloads)."""
        text = self.log.read_text(errors="replace")
        return len(re.findall(rf'"GET /v2/[^ ]+/blobs/{re.escape(digest)} HTTP/1\.1" 20[06]', text))

    def settled_blob_gets(self, digests: list[str], timeout_s: float = 10.0) -> list[int]:
        """Counts once every digest was served at least once (the access log is written after the response)."""
        deadline = time.monotonic() + timeout_s
        while any(self.blob_gets(d) == 0 for d in digests) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # let any further (duplicate) downloads' lines land too
        return [self.blob_gets(d) for d in digests]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    root = tmp_path / "registry"
    root.mkdir()
    port = _free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = root / "registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["/usr/bin/docker-registry", "serve", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield Registry(f"127.0.0.1:{port}", log)
    finally:
        proc.kill()
        proc.wait(10)
