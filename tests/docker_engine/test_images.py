"""Layer-store images get into Docker once per digest, merged exactly as overlayfs merges them."""

from __future__ import annotations

import dataclasses
import os
import secrets
import time

import docker.errors
import pytest

from dsec.errors import RuntimeFailure
from dsec.substrates.base import ImageConfig, ImageRootfs
from dsec.substrates.container.docker_images import DIGEST_LABEL, ensure_image, image_tag


@pytest.fixture
def fresh_image(busybox_image, docker_client):
    """The busybox layers under a digest the engine has never seen; removed afterwards."""
    image = dataclasses.replace(busybox_image, digest="sha256:" + secrets.token_hex(32))
    yield image
    try:
        docker_client.images.remove(image_tag(image), force=True)
    except docker.errors.ImageNotFound:
        pass


@pytest.mark.timeout(120)
def test_import_merges_layers_applies_config_and_is_cached(fresh_image, docker_client):
    tag = ensure_image(docker_client, fresh_image)
    assert tag == f"dsec:{fresh_image.digest[7:19]}"
    imported = docker_client.images.get(tag)
    assert imported.labels[DIGEST_LABEL] == fresh_image.digest
    assert "FROM_IMAGE=yes" in imported.attrs["Config"]["Env"]
    assert imported.attrs["Config"]["Cmd"] == ["sh"]
    out = docker_client.containers.run(tag, ["cat", "/etc/layer"], remove=True, network_mode="none")
    assert out == b"top\n", "the top layer must win, as in the overlay merge"

    started = time.monotonic()
    assert ensure_image(docker_client, fresh_image) == tag
    assert time.monotonic() - started < 1.0, "a second ensure of the same digest must not import again"
    assert docker_client.images.get(tag).id == imported.id


@pytest.mark.timeout(120)
def test_overlay_whiteouts_hide_lower_files(fresh_image, docker_client, tmp_path):
    deleter = tmp_path / "deleter"
    (deleter / "etc").mkdir(parents=True)
    os.mknod(deleter / "etc" / "passwd", 0o600 | 0o020000, os.makedev(0, 0))  # overlay whiteout
    image = dataclasses.replace(fresh_image, lower_dirs=[deleter, *fresh_image.lower_dirs])
    tag = ensure_image(docker_client, image)
    out = docker_client.containers.run(tag, ["ls", "/etc"], remove=True, network_mode="none").split()
    assert b"passwd" not in out, "a whiteout in an upper layer must delete the lower file"
    assert b"layer" in out


@pytest.mark.timeout(60)
def test_unreadable_layers_fail_typed_and_leave_no_tag(docker_client, tmp_path):
    image = ImageRootfs("broken", "sha256:" + secrets.token_hex(32), [tmp_path / "gone", tmp_path / "also-gone"], ImageConfig())
    with pytest.raises(RuntimeFailure, match="broken"):
        ensure_image(docker_client, image)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(image_tag(image))
    empty = ImageRootfs("empty", "sha256:" + secrets.token_hex(32), [], ImageConfig())
    with pytest.raises(RuntimeFailure, match="no layers"):
        ensure_image(docker_client, empty)


def test_engine_progress_errors_are_found():
    from dsec.substrates.container.docker_images import _stream_error

    assert _stream_error('{"status":"sha256:abc"}\n') == ""
    assert _stream_error('{"status":"x"}\n{"errorDetail":{"message":"no space"},"error":"no space"}\n') == "no space"
