"""Fixtures for the crun/runc container driver: a busybox image built from busybox-static, a private DSEC_HOME."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dsec.config import ServerConfig
from dsec.models import SandboxSpec
from dsec.substrates.base import Exited, ImageConfig, ImageRootfs, Output
from dsec.substrates.container.driver import ContainerDriver, ContainerSandbox, container_driver

PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
RUNTIMES = ["crun", "runc"]


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> ImageRootfs:
    """A one-layer busybox rootfs (every applet as a symlink), like an image the layer store would hand over."""
    layer = tmp_path_factory.mktemp("busybox-layer")
    (layer / "bin").mkdir()
    shutil.copy("/bin/busybox", layer / "bin" / "busybox")
    subprocess.run(["chroot", str(layer), "/bin/busybox", "--install", "-s", "/bin"], check=True)
    for name in ("etc", "tmp", "root", "proc", "sys", "dev", "mnt"):
        (layer / name).mkdir(exist_ok=True)
    (layer / "tmp").chmod(0o1777)
    (layer / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (layer / "etc" / "layer").write_text("busybox-test\n")
    return ImageRootfs(
        reference="busybox-test",
        digest="sha256:" + "0" * 64,
        lower_dirs=[layer],
        config=ImageConfig(env=[f"PATH={PATH}", "FROM_IMAGE=1"]),
    )


@pytest.fixture(scope="session")
def config(tmp_path_factory: pytest.TempPathFactory) -> ServerConfig:
    """A private home: runtime state roots that only these tests use (so `list` shows only our containers)."""
    return ServerConfig(home=tmp_path_factory.mktemp("container-home"))


@pytest.fixture(params=RUNTIMES)
def driver(request: pytest.FixtureRequest, config: ServerConfig) -> ContainerDriver:
    return container_driver(request.param, config)


@pytest.fixture
def make_sandbox(
    driver: ContainerDriver, busybox_image: ImageRootfs, tmp_path: Path
) -> Iterator[Callable[..., ContainerSandbox]]:
    """Create sandboxes that are destroyed after the test, also when it fails."""
    made: list[ContainerSandbox] = []

    def make(spec: SandboxSpec | None = None, image: ImageRootfs | None = None) -> ContainerSandbox:
        sandbox_id = new_id()
        sb = driver.create(sandbox_id, spec or SandboxSpec(), image or busybox_image, tmp_path / sandbox_id)
        made.append(sb)
        return sb

    yield make
    for sb in made:
        driver.destroy(sb)


def new_id() -> str:
    return "ct-" + uuid.uuid4().hex[:12]


def run(
    sb: ContainerSandbox, argv: list[str], env: dict[str, str] | None = None, cwd: str = "/", stdin: bytes | None = None
) -> tuple[bytes, bytes, Exited]:
    """Run argv to completion in `sb`: (stdout, stderr, exit)."""
    proc = sb.spawn(argv, {"PATH": PATH, **(env or {})}, cwd, stdin=stdin is not None)
    if stdin is not None:
        proc.write_stdin(stdin)
        proc.close_stdin()
    out, err = bytearray(), bytearray()
    for event in proc.events():
        if isinstance(event, Output):
            (out if event.stream == "stdout" else err).extend(event.data)
        else:
            return bytes(out), bytes(err), event
    raise AssertionError("process ended without an Exited event")


def sh(sb: ContainerSandbox, script: str) -> str:
    """stdout of `sh -c script`, which must succeed."""
    out, err, exited = run(sb, ["sh", "-c", script])
    assert exited.exit_code == 0, (script, out, err, exited)
    return out.decode()
