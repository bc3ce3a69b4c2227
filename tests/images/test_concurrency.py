"""Several processes importing and resolving the same image at once: one extraction per layer, no torn state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsec.images.store import LayerStore
from .layers import Entry, layer_tar, oci_layout, sha

WORKER = r"""
import json, os, sys
from pathlib import Path
from dsec.images.store import LayerStore
store = LayerStore(Path(sys.argv[1]))
record = store.import_oci_layout(Path(sys.argv[2]), tag=sys.argv[3])
inodes = []
for _ in range(20):
    rootfs = store.resolve("shared")
    inodes.append([os.stat(p).st_ino for p in rootfs.lower_dirs])
print(json.dumps({"digest": record.digest, "inodes": inodes}))
"""


@pytest.mark.timeout(120)
def test_concurrent_import_and_resolve_from_processes(tmp_path: Path) -> None:
    layers = [layer_tar([Entry(f"f{i}", os.urandom(256 * 1024)) for i in range(8)]) for _ in range(3)]
    layout = oci_layout(tmp_path / "layout", layers, gzip_layers=True)
    root = tmp_path / "images"
    LayerStore(root).import_oci_layout(oci_layout(tmp_path / "seed", layers[:1]), tag="shared")  # resolvable from the start
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(layout), "shared" if i % 2 else f"t{i}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(6)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=100)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert len({r["digest"] for r in results}) == 1
    store = LayerStore(root)
    try:
        assert sorted(p.name for p in store.layers_dir.iterdir()) == sorted(sha(raw)[7:] for raw in layers)
        final = [os.stat(store.layer_path(sha(raw))).st_ino for raw in layers]
        for r in results:  # every process saw only the final, single extraction of each layer
            for seen in r["inodes"]:
                assert set(seen) <= set(final)
        assert list(store.tmp_dir.iterdir()) == []
        assert store.inspect("shared").digest == results[0]["digest"]
    finally:
        store.close()
