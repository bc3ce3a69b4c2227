"""Corrupt `docker save` archives found by bench/fuzz.py: each is refused with a typed InvalidSpec, never a raw
tarfile error (which the image service would report as an internal failure)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from dsec.errors import InvalidSpec
from dsec.images.importers import import_docker_archive
from dsec.images.store import LayerStore

FUZZ_BENCH = Path(__file__).resolve().parents[2] / "bench" / "fuzz.py"


def _seed_docker_archive() -> bytes:
    spec = importlib.util.spec_from_file_location("dsec_bench_fuzz", FUZZ_BENCH)
    module = sys.modules.setdefault("dsec_bench_fuzz", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module.seed_images()["docker"][0]


def test_the_seed_archive_imports(tmp_path):
    archive = tmp_path / "seed.tar"
    archive.write_bytes(_seed_docker_archive())
    record = import_docker_archive(LayerStore(tmp_path / "store", layer_format="dir"), archive, "fuzz:seed")
    assert record.digest.startswith("sha256:")


def test_every_truncation_is_imported_or_invalid_spec(tmp_path):
    """Cut at every 509th byte (headers, data, padding): a typed refusal or, past the last member, an import."""
    data = _seed_docker_archive()
    refused = 0
    for cut in range(0, len(data), 509):
        archive = tmp_path / f"cut-{cut}.tar"
        archive.write_bytes(data[:cut])
        try:
            import_docker_archive(LayerStore(tmp_path / f"store-{cut}", layer_format="dir"), archive, None)
        except InvalidSpec:
            refused += 1
    assert refused > 0
