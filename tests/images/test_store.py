"""LayerStore: import OCI layouts and docker-save tars, resolve, tag, remove, dedup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dsec.errors import ImageNotFound, InvalidSpec
from dsec.images.store import LayerStore
from .layers import Entry, docker_archive, layer_tar, oci_layout, sha

BASE = layer_tar([Entry("bin", kind="dir"), Entry("bin/tool", b"#!/bin/sh\necho hi\n", mode=0o755),
                  Entry("etc", kind="dir"), Entry("etc/motd", b"base\n"), Entry("etc/owned", b"x", uid=1234, gid=99)])
TOP = layer_tar([Entry("etc", kind="dir"), Entry("etc/motd", b"top\n"), Entry("etc/link", kind="symlink", link="motd"),
                 Entry("etc/hard", kind="hardlink", link="etc/motd")])


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar+gzip"])
def test_import_oci_layout_and_resolve(fmt_store: LayerStore, tmp_path: Path, gz: bool) -> None:
    layout = oci_layout(tmp_path / "layout", [BASE, TOP], gzip_layers=gz, cmd=["echo", "x"])
    record = fmt_store.import_oci_layout(layout, tag="demo:1")
    assert record.tags == ["demo:1"]
    assert [layer.diff_id for layer in record.layers] == [sha(BASE), sha(TOP)]
    rootfs = fmt_store.resolve("demo:1")
    assert rootfs.digest == record.digest
    top, base = rootfs.lower_dirs
    assert (top / "etc/motd").read_bytes() == b"top\n" and (base / "etc/motd").read_bytes() == b"base\n"
    assert os.readlink(top / "etc/link") == "motd"
    assert os.stat(top / "etc/hard").st_ino == os.stat(top / "etc/motd").st_ino
    assert os.stat(base / "bin/tool").st_mode & 0o777 == 0o755
    assert (os.stat(base / "etc/owned").st_uid, os.stat(base / "etc/owned").st_gid) == (1234, 99)
    assert rootfs.config.cmd == ["echo", "x"] and rootfs.config.workdir == "/work" and rootfs.config.user == "1000"
    assert "A=1" in rootfs.config.env
    assert fmt_store.resolve(record.digest).digest == record.digest  # by full digest
    assert fmt_store.resolve(record.digest[:15]).digest == record.digest  # by unique prefix


def test_import_docker_archive_keeps_repo_tags(store: LayerStore, tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "img.tar", [BASE, TOP], ["example/app:v2"])
    record = store.import_docker_archive(archive)
    assert record.tags == ["example/app:v2"]
    assert [layer.blob_digest for layer in record.layers] == [sha(BASE), sha(TOP)]  # uncompressed: blob == diff_id
    assert (store.resolve("example/app:v2").lower_dirs[0] / "etc/motd").read_bytes() == b"top\n"
    assert store.import_docker_archive(archive, tag="other").tags == ["example/app:v2", "other"]


def test_unknown_ref_lists_known_tags(store: LayerStore, tmp_path: Path) -> None:
    store.import_oci_layout(oci_layout(tmp_path / "l", [BASE]), tag="known-one")
    with pytest.raises(ImageNotFound, match="known-one"):
        store.resolve("nope")
    with pytest.raises(ImageNotFound):
        store.resolve("sha256:" + "0" * 64)
    with pytest.raises(InvalidSpec):
        store.resolve("sha256:../../etc")


def test_tag_list_remove(store: LayerStore, tmp_path: Path) -> None:
    record = store.import_oci_layout(oci_layout(tmp_path / "l", [BASE]), tag="a")
    store.tag("a", "b:latest")
    assert store.inspect("b").digest == record.digest  # `b` means `b:latest`
    assert [r.tags for r in store.list()] == [["a", "b:latest"]]
    assert store.remove("a") == []  # untag only: `b` still names it
    assert store.remove("b") == [record.digest]  # last tag gone → record deleted
    assert store.list() == []
    with pytest.raises(InvalidSpec):
        store.tag(record.digest, "bad tag with spaces")


def test_dedup_same_layer_extracted_once(fmt_store: LayerStore, tmp_path: Path) -> None:
    one = fmt_store.import_oci_layout(oci_layout(tmp_path / "one", [BASE]), tag="one")
    erofs = fmt_store.layer_format == "erofs"
    layer_dir = fmt_store.erofs_path(sha(BASE)) if erofs else fmt_store.layer_path(sha(BASE))
    inode = os.stat(layer_dir).st_ino
    # Same layer again, this time gzip-compressed (different blob, same diff_id), under a second image.
    two = fmt_store.import_oci_layout(oci_layout(tmp_path / "two", [BASE, TOP], gzip_layers=True), tag="two")
    assert two.digest != one.digest
    assert os.stat(layer_dir).st_ino == inode
    suffix = ".erofs" if erofs else ""
    assert sorted(p.name for p in fmt_store.layers_dir.iterdir()) == sorted([sha(BASE)[7:] + suffix, sha(TOP)[7:] + suffix])
    calls = []

    def opener():
        calls.append(1)
        raise AssertionError("a present layer must not be re-read")

    fmt_store.ensure_layer(sha(TOP), two.layers[1].blob_digest, opener)
    assert calls == []


def test_reimport_is_idempotent(store: LayerStore, tmp_path: Path) -> None:
    layout = oci_layout(tmp_path / "l", [BASE, TOP])
    first = store.import_oci_layout(layout, tag="x")
    second = store.import_oci_layout(layout, tag="x")
    assert first.digest == second.digest and len(store.list()) == 1
    assert list(store.tmp_dir.iterdir()) == []


def test_not_a_layout_or_archive(store: LayerStore, tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec, match="not an OCI image layout"):
        store.import_oci_layout(tmp_path)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(InvalidSpec):
        store.import_docker_archive(junk)


def test_acquire_pins_against_remove(fmt_store: LayerStore, tmp_path: Path) -> None:
    record = fmt_store.import_oci_layout(oci_layout(tmp_path / "l", [BASE]), tag="pinned")
    rootfs = fmt_store.acquire("pinned", "sb-1")
    assert rootfs.digest == record.digest and fmt_store.inspect("pinned").holders == 1
    from dsec.errors import SandboxStateError

    with pytest.raises(SandboxStateError, match="sb-1"):
        fmt_store.remove(record.digest)
    fmt_store.release("sb-1")
    fmt_store.release("sb-1")  # idempotent
    assert fmt_store.remove(record.digest) == [record.digest]
