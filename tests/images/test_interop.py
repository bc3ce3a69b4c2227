"""Round trips with real tools: skopeo and umoci read our OCI layouts; Docker Engine loads our docker-save tars."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from dsec.images.base_images import build_busybox
from dsec.images.export import export_docker_archive, export_oci_layout
from dsec.images.store import LayerStore
from dsec.substrates.container.dockerd import ensure_engine
from .layers import Entry, layer_tar, oci_layout


def run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout


@pytest.mark.timeout(180)
def test_skopeo_and_umoci_read_our_layout(store: LayerStore, tmp_path: Path) -> None:
    record = build_busybox(store)
    layout = export_oci_layout(store, "busybox", tmp_path / "layout", ref_name="v1")
    info = json.loads(run("skopeo", "inspect", "--raw", f"oci:{layout}:v1"))
    assert [layer["digest"] for layer in info["layers"]] == [layer.blob_digest for layer in record.layers]
    copy = tmp_path / "copy"
    run("skopeo", "copy", "--quiet", f"oci:{layout}:v1", f"oci:{copy}:again")
    again = store.import_oci_layout(copy, tag="skopeo-copy")
    assert again.config_digest == record.config_digest
    assert [layer.diff_id for layer in again.layers] == [layer.diff_id for layer in record.layers]
    bundle = tmp_path / "bundle"
    run("umoci", "unpack", "--image", f"{layout}:v1", str(bundle))
    assert (bundle / "rootfs" / "bin" / "busybox").is_file()
    assert (bundle / "rootfs" / "bin" / "sh").is_symlink()


@pytest.mark.timeout(180)
def test_docker_load_of_our_export_and_import_of_docker_save(store: LayerStore, tmp_path: Path) -> None:
    docker = ["docker", "-H", ensure_engine(use_docker_host=False)]
    raw = [layer_tar([Entry("bin", kind="dir"), Entry("bin/x", b"layer one\n")]),
           layer_tar([Entry("bin", kind="dir"), Entry("bin/.wh.x"), Entry("bin/y", b"layer two\n")])]
    record = store.import_oci_layout(oci_layout(tmp_path / "l", raw, gzip_layers=True), tag="interop")
    name = f"dsec-test-interop-{uuid.uuid4().hex[:8]}:v1"
    archive = export_docker_archive(store, "interop", tmp_path / "out.tar", repo_tags=[name])
    try:
        run(*docker, "load", "-i", str(archive))
        inspected = json.loads(run(*docker, "image", "inspect", name))[0]
        assert inspected["Id"] == record.config_digest  # the config went through byte for byte
        assert inspected["RootFS"]["Layers"] == [layer.diff_id for layer in record.layers]
        saved = tmp_path / "saved.tar"
        run(*docker, "save", "-o", str(saved), name)
        back = store.import_docker_archive(saved, tag="back")
        assert [layer.diff_id for layer in back.layers] == [layer.diff_id for layer in record.layers]
        assert back.config.cmd == record.config.cmd
        top = store.resolve("back").lower_dirs[0]
        assert (top / "bin" / "y").read_bytes() == b"layer two\n"
    finally:
        subprocess.run([*docker, "rmi", "-f", name], capture_output=True, timeout=60)
