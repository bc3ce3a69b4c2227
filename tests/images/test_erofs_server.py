"""A real server with layer_format=erofs: creates mount layers, destroys and the dead-server reaper unmount them."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import dsec
from dsec.images.base_images import build_busybox
from dsec.images.store import LayerStore
from dsec.server.launch import launch_server, stop_server_process
from .conftest import mounts_under


@pytest.mark.timeout(240)
def test_server_mounts_erofs_layers_and_reaper_unmounts_after_kill_9(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    images = home / "images"
    seed = LayerStore(images, "erofs")
    build_busybox(seed)
    seed.close()
    monkeypatch.setenv("DSEC_LAYER_FORMAT", "erofs")
    first = launch_server(home, [], "erofs", new_session=True)
    second = None
    try:
        client = dsec.Client(first.address)
        sandbox = client.create("busybox")
        result = sandbox.exec(["sh", "-c", "head -1 /etc/passwd"])
        assert result.exit_code == 0 and result.stdout.startswith(b"root:")
        client.destroy(sandbox.id)  # returns once it is killed; the teardown (and the layer's release) follows
        deadline = time.monotonic() + 60
        while mounts_under(images / "mounts") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mounts_under(images / "mounts") == []  # the last holder's release unmounted the layer
        kept = client.create("busybox")
        assert len(mounts_under(images / "mounts")) == 1
        client.close()
        os.killpg(first.process.pid, signal.SIGKILL)  # the sandbox and its layer mount outlive the server
        first.process.wait()
        assert len(mounts_under(images / "mounts")) == 1
        second = launch_server(home, [], "erofs-2", new_session=True)  # ready only after reaping kept's leftovers
        assert mounts_under(images / "mounts") == [], f"sandbox {kept.id}'s layer mount survived the reaper"
    finally:
        for server in (first, second):
            if server is not None:
                stop_server_process(server.process)
        leftover = LayerStore(images, "erofs")
        leftover.unmount_unused(keep=set())
        leftover.close()
    assert mounts_under(home) == []
