"""Fixtures for the Docker driver tests (folder not named `docker`: it would shadow the docker SDK on sys.path): the real engine, a real busybox image in two layers, a real driver.

The image is built here from the host's busybox-static rather than taken from the layer store, so these tests
exercise exactly the driver (import, limits, agent, cleanup) and nothing else. Its digest is the hash of its
content, so the engine keeps one import across runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from dsec.config import ServerConfig
from dsec.substrates.base import DriverSandbox, Exited, ImageConfig, ImageRootfs, Output
from dsec.substrates.container.dockerd import ensure_engine

BUSYBOX = Path(shutil.which("busybox") or "/bin/busybox")


def build_busybox_layers(root: Path) -> list[Path]:
    """Two overlay layers, top-most first: busybox with every applet, then a top layer overriding one file."""
    base, top = root / "base", root / "top"
    for d in ("bin", "etc", "tmp", "root", "proc", "sys", "dev"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, base / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = base / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (base / "etc" / "layer").write_text("base\n")
    (base / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (top / "etc").mkdir(parents=True, exist_ok=True)
    (top / "etc" / "layer").write_text("top\n")
    return [top, base]


def content_digest(dirs: list[Path]) -> str:
    h = hashlib.sha256(b"dsec-tests-docker-busybox-v1")
    for d in dirs:
        for path in sorted(d.rglob("*")):
            h.update(str(path.relative_to(d)).encode())
            if path.is_file() and not path.is_symlink():
                h.update(path.read_bytes())
    return "sha256:" + h.hexdigest()


@pytest.fixture(scope="session")
def engine_url() -> str:
    return ensure_engine()


@pytest.fixture(scope="session")
def docker_client(engine_url: str) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=engine_url, version="auto", timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> ImageRootfs:
    dirs = build_busybox_layers(tmp_path_factory.mktemp("busybox-layers"))
    config = ImageConfig(env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "FROM_IMAGE=yes"], cmd=["sh"], workdir="/")
    return ImageRootfs("test-busybox", content_digest(dirs), dirs, config)


@pytest.fixture(scope="session")
def driver(engine_url: str):
    from dsec.substrates.container.docker_driver import DockerDriver

    return DockerDriver(ServerConfig(home=Path(os.environ["DSEC_HOME"])))


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "sandbox-state"
    d.mkdir()
    return d


@pytest.fixture
def make_sandbox(driver, busybox_image: ImageRootfs, tmp_path: Path, docker_client: docker.DockerClient):
    """Create sandboxes; every one is destroyed at teardown, and none may be left in the engine."""
    made: list[tuple[str, DriverSandbox]] = []

    def make(spec, sandbox_id: str | None = None) -> DriverSandbox:
        sandbox_id = sandbox_id or f"t{os.urandom(6).hex()}"
        state = tmp_path / sandbox_id
        state.mkdir()
        sb = driver.create(sandbox_id, spec, busybox_image, state)
        made.append((sandbox_id, sb))
        return sb

    yield make
    from dsec.substrates.container.docker_driver import SANDBOX_LABEL

    for sandbox_id, sb in made:
        driver.destroy(sb)
        left = docker_client.containers.list(all=True, filters={"label": f"{SANDBOX_LABEL}={sandbox_id}"})
        assert not left, f"sandbox {sandbox_id} left containers {left}"


def run(sb: DriverSandbox, argv: list[str], env: dict[str, str] | None = None, cwd: str = "/", stdin: bytes | None = None) -> tuple[bytes, bytes, Exited]:
    """Run one command to completion through the driver's own spawn: (stdout, stderr, exit)."""
    proc = sb.spawn(argv, env or {}, cwd, stdin=stdin is not None)
    if stdin is not None:
        proc.write_stdin(stdin)
        proc.close_stdin()
    out, err = bytearray(), bytearray()
    for event in proc.events():
        if isinstance(event, Output):
            (out if event.stream == "stdout" else err).extend(event.data)
        else:
            return bytes(out), bytes(err), event
    raise AssertionError(f"process {argv} ended without an Exited event")
