"""Shared VM fixtures: one busybox root filesystem, one driver per machine kind, sandboxes that always die.

The first test of a kind boots its template once (cached under $DSEC_HOME/vm/templates/ across runs); every
other sandbox is a restore from it, so the suite stays within a few minutes under TCG.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dsec.config import ServerConfig
from dsec.models import SandboxSpec
from dsec.substrates.base import Exited, ImageConfig, ImageRootfs, Output
from dsec.substrates.vm import vm_driver
from dsec.substrates.vm.driver import QemuDriver, VmSandbox

BUSYBOX = Path("/bin/busybox")
MEMORY_MB = 256  # the shape tests/core uses too, so both share one template per kind


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> ImageRootfs:
    """A one-layer busybox image; its digest hashes the binary, so its disk and templates are reused across runs."""
    root = tmp_path_factory.mktemp("vm-rootfs")
    (root / "bin").mkdir()
    (root / "etc").mkdir()
    (root / "root").mkdir()
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    subprocess.run(["chroot", str(root), "/bin/busybox", "--install", "-s", "/bin"], check=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    digest = hashlib.sha256(BUSYBOX.read_bytes() + b"dsec-vm-test-rootfs-1").hexdigest()
    return ImageRootfs("vm-test-busybox", f"sha256:{digest}", [root], ImageConfig(env=["PATH=/bin"]))


@pytest.fixture(scope="session")
def server_config() -> ServerConfig:
    return ServerConfig()


@pytest.fixture(scope="session", params=["microvm", "vm"])
def driver(request: pytest.FixtureRequest, server_config: ServerConfig) -> QemuDriver:
    built = vm_driver(request.param, server_config)
    assert isinstance(built, QemuDriver)
    return built


@pytest.fixture(scope="session")
def microvm_driver(server_config: ServerConfig) -> QemuDriver:
    built = vm_driver("microvm", server_config)
    assert isinstance(built, QemuDriver)
    return built


def spec_for(substrate: str, **resources: float) -> SandboxSpec:
    return SandboxSpec(substrate=substrate, resources={"memory_mb": MEMORY_MB, **resources})


@pytest.fixture
def make_vm(tmp_path: Path) -> Iterator[Callable[..., VmSandbox]]:
    """Create (or restore) VMs whose QEMU and files are gone after the test, pass or fail."""
    made: list[tuple[QemuDriver, VmSandbox, Path]] = []

    def make(driver: QemuDriver, image: ImageRootfs, snapshot: Path | None = None, **resources: float) -> VmSandbox:
        sandbox_id = f"sb-test{len(made)}"
        state_dir = tmp_path / sandbox_id
        spec = spec_for(driver.substrate, **resources)
        if snapshot is None:
            sandbox = driver.create(sandbox_id, spec, image, state_dir)
        else:
            sandbox = driver.restore(sandbox_id, spec, image, snapshot, state_dir)
        made.append((driver, sandbox, state_dir))
        return sandbox

    yield make
    for driver, sandbox, state_dir in made:
        driver.destroy(sandbox)
        assert not sandbox.process.alive()
        assert list(state_dir.iterdir()) == [], f"{state_dir} kept files after destroy"


def run(sandbox: VmSandbox, script: str) -> tuple[bytes, bytes, int]:
    """Run `sh -c script` in the guest; (stdout, stderr, exit code)."""
    out, err = bytearray(), bytearray()
    code = -1
    for event in sandbox.spawn(["sh", "-c", script], {"PATH": "/bin"}, "/").events():
        if isinstance(event, Output):
            (out if event.stream == "stdout" else err).extend(event.data)
        elif isinstance(event, Exited):
            code = event.exit_code
    return bytes(out), bytes(err), code
