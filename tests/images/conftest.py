"""Fixtures for the image store tests: a fresh store per test, under a temp dir on the real filesystem."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dsec.images.store import LayerStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LayerStore]:
    s = LayerStore(tmp_path / "images")
    try:
        yield s
    finally:
        s.close()
