"""Fixtures for the image tests: a fresh store per test (temp dir, real filesystem) and a real registry."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsec.images.store import LayerStore
from tests.support.registry import Registry, running_registry


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


class ImageRegistry(Registry):
    """The shared test registry, with the download counts the image tests assert on."""

    def blob_gets(self, digest: str) -> int:
        """How many times the registry served `digest` (its own access log: the ground truth for downloads)."""
        return self.count(rf'"GET /v2/[^ ]+/blobs/{re.escape(digest)} HTTP/1\.1" 20[06]')

    def settled_blob_gets(self, digests: list[str], timeout_s: float = 10.0) -> list[int]:
        """Counts once every digest was served at least once (the access log is written after the response)."""
        deadline = time.monotonic() + timeout_s
        while any(self.blob_gets(d) == 0 for d in digests) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # let any further (duplicate) downloads' lines land too
        return [self.blob_gets(d) for d in digests]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ImageRegistry]:
    with running_registry(tmp_path / "registry") as running:
        yield ImageRegistry(running.host, running.root, running.log)
