"""Image USER: names and numbers resolved in the image's own passwd/group, applied to every spawned process."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from dsec.config import ServerConfig
from dsec.errors import InvalidSpec
from dsec.images.base_images import build_busybox
from dsec.images.build import build, parse_dockerfile
from dsec.images.local import run_driver
from dsec.images.store import LayerStore
from dsec.images.user import resolve_user
from dsec.models import SandboxSpec
from dsec.server.drivers import DriverRegistry
from dsec.substrates.base import Exited, Output


@pytest.fixture
def root(tmp_path: Path) -> Path:
    etc = tmp_path / "root" / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n# comment\n")
    (etc / "group").write_text("root:x:0:\nstaff:x:50:app\n")
    return tmp_path / "root"


def test_resolve_names_and_numbers(root: Path) -> None:
    assert resolve_user("", root) is None
    assert resolve_user("app", root) == (1000, 1001)
    assert resolve_user("app:staff", root) == (1000, 50)
    assert resolve_user("1000", root) == (1000, 1001)  # a listed uid keeps its primary group
    assert resolve_user("4242", root) == (4242, 0)  # like Docker: an unlisted uid gets gid 0
    assert resolve_user("4242:77", root) == (4242, 77)
    assert resolve_user("root:50", root) == (0, 50)


@pytest.mark.parametrize("bad", ["ghost", "app:nogroup", ":5", "a:b:c"])
def test_unknown_or_malformed_users_are_rejected(root: Path, bad: str) -> None:
    with pytest.raises(InvalidSpec):
        resolve_user(bad, root, "sb-1")


def test_symlinked_passwd_is_not_followed(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "host-passwd"
    outside.write_text("evil:x:7:7::/:/bin/sh\n")
    (root / "etc" / "passwd").unlink()
    (root / "etc" / "passwd").symlink_to(outside)
    with pytest.raises(InvalidSpec, match="not in the image"):
        resolve_user("evil", root)
    assert resolve_user("7", root) == (7, 0)


def _run(sandbox, argv: list[str]) -> tuple[int, str]:
    out, code = b"", -1
    for event in sandbox.spawn(argv, {"PATH": "/bin"}, "/").events():
        if isinstance(event, Output):
            out += event.data
        elif isinstance(event, Exited):
            code = event.exit_code
    return code, out.decode()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_user_applies_to_run_steps_and_execs(fmt_store: LayerStore, tmp_path: Path, runtime: str) -> None:
    store = fmt_store
    build_busybox(store)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    named = build(store, parse_dockerfile("FROM busybox\nUSER nobody\nRUN id -u > /tmp/run-uid\n"), tag="u:named", context=ctx, run_driver=run_driver)
    numeric = build(store, parse_dockerfile("FROM busybox\nUSER 1234:5678\n"), tag="u:num", context=ctx, run_driver=run_driver)
    run_layer = store.resolve("u:named").lower_dirs[0]
    assert (run_layer / "tmp" / "run-uid").read_text() == "65534\n"  # the RUN step ran as the image USER
    assert os.stat(run_layer / "tmp" / "run-uid").st_uid == 65534
    driver = DriverRegistry(ServerConfig()).get(runtime)
    for tag, expected in (("u:named", "65534 65534"), ("u:num", "1234 5678"), ("busybox", "0 0")):
        state = store.new_tmp("-user")
        state.mkdir()
        sandbox = driver.create(f"user-{uuid.uuid4().hex[:10]}", SandboxSpec(image=tag, driver=runtime), store.resolve(tag), state)
        try:
            code, out = _run(sandbox, ["sh", "-c", 'echo "$(id -u) $(id -g)"'])
            assert (code, out.strip()) == (0, expected), tag
        finally:
            try:
                driver.destroy(sandbox)
            finally:
                driver.cleanup_state_dir(state)
    assert numeric.record.config.user == "1234:5678"


def test_resolve_in_layers_honours_whiteouts_and_the_top_most_copy(tmp_path: Path) -> None:
    top, mid, base = (tmp_path / n / "etc" for n in ("top", "mid", "base"))
    for etc in (top, mid, base):
        etc.mkdir(parents=True)
    (base / "passwd").write_text("old:x:5:5::/:/bin/sh\n")
    (mid / "passwd").write_text("new:x:6:6::/:/bin/sh\n")
    layers = [top.parent, mid.parent, base.parent]
    assert resolve_user("new", layers) == (6, 6)
    with pytest.raises(InvalidSpec):
        resolve_user("old", layers)  # hidden by the upper copy
    os.mknod(top / "passwd", 0o020000, os.makedev(0, 0))  # whiteout: no passwd at all in the merged view
    with pytest.raises(InvalidSpec):
        resolve_user("new", layers)


@pytest.mark.timeout(240)
def test_docker_driver_applies_image_user(store: LayerStore, tmp_path: Path) -> None:
    build_busybox(store)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    build(store, parse_dockerfile("FROM busybox\nUSER nobody:0\n"), tag="u:docker", context=ctx, run_driver=run_driver)
    driver = DriverRegistry(ServerConfig()).get("docker")
    state = Path(tempfile.mkdtemp(prefix="dsec-u-"))  # short: the agent socket path lives under it
    sandbox = driver.create(f"user-{uuid.uuid4().hex[:10]}", SandboxSpec(image="u:docker", driver="docker"), store.resolve("u:docker"), state)
    try:
        assert _run(sandbox, ["sh", "-c", 'echo "$(id -u) $(id -g)"']) == (0, "65534 0\n")
    finally:
        try:
            driver.destroy(sandbox)
        finally:
            driver.cleanup_state_dir(state)
            shutil.rmtree(state, ignore_errors=True)
