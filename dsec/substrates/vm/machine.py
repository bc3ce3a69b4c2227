"""One QEMU process: its command line, its files in a state directory, start, stop and kill-by-pid-file.

The two machine kinds differ only in the machine type and the transport of the same three virtio devices
(root disk, serial port for the agent): `-M microvm` uses virtio-mmio (`*-device`), q35 uses PCI (`*-pci`).
Everything a dead server must clean up is named in the state directory: `qemu.pid` and the files next to it,
so `kill_from_state_dir` needs no live object.

QEMU connects *to* the host's agent socket (chardev client) at startup, before any guest code runs: the guest's
virtio-serial port therefore never sees "host disconnected", neither at cold boot nor after a restore.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from dsec.errors import RuntimeFailure
from dsec.substrates.vm import volumes as volume_disks
from dsec.substrates.vm.net import GUEST_MAC, TAP
from dsec.substrates.vm.qmp import QmpClient

MachineKind = Literal["microvm", "q35"]
PID_FILE = "qemu.pid"
QMP_SOCKET = "qmp.sock"
AGENT_SOCKET = "agent.sock"
SERIAL_LOG = "serial.log"
QEMU_LOG = "qemu.log"
DISK = "disk.qcow2"


@dataclass(frozen=True)
class MachineSpec:
    """Everything that must be equal between a snapshot and its restore (the device model)."""

    kind: MachineKind
    accel: str
    memory_mb: int
    cpus: int
    kernel: str
    initrd: str
    cmdline: str
    nic: bool = False  # a virtio-net NIC (allowlisted sandboxes only); part of the device model, so of the template key
    volumes: tuple[str, ...] = ()  # named volumes' disks, "ro:<image>" / "rw:<image>" (vm/volumes.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "volumes", tuple(self.volumes))  # a list after a JSON round trip

    def to_dict(self) -> dict:
        return asdict(self)


def host_tsc_khz() -> int:
    """The host TSC rate, which a TCG guest's TSC runs at (0 if unknown).

    Why: under TCG the guest kernel's TSC calibration against the emulated PIT fails at random on a loaded
    host (measured: 5 of 6 boots hung after "Marking TSC unstable"); `tsc_early_khz=` skips calibration.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 0


def guest_cmdline(base: str, accel: str) -> str:
    """The kernel command line for `accel` (TCG needs the TSC rate handed in, see host_tsc_khz)."""
    khz = host_tsc_khz() if accel == "tcg" else 0
    return f"{base} tsc_early_khz={khz}" if khz else base


def nic_args(transport: str, tap: bool) -> list[str]:
    """The NIC of an allowlisted machine: virtio-net on a tap in the sandbox's netns, or (template boot) on a hub.

    Why a hub for the template: the saved state holds the device, not its backend, and a tap exists only inside
    a sandbox's netns. `vnet_hdr=off` keeps the tap's offered features equal to the hub's, so a restore matches.
    """
    backend = f"tap,id=net0,ifname={TAP},script=no,downscript=no,vnet_hdr=off" if tap else "hubport,id=net0,hubid=0"
    return ["-netdev", backend, "-device", f"virtio-net-{transport},netdev=net0,mac={GUEST_MAC}"]


def qemu_argv(qemu: str, machine: MachineSpec, state_dir: Path, incoming: Path | None, netns: Path | None = None) -> list[str]:
    """The QEMU command line of a machine whose files live in `state_dir` (run inside `netns` when given)."""
    transport = "device" if machine.kind == "microvm" else "pci"
    machine_opt = "microvm,x-option-roms=off,rtc=on" if machine.kind == "microvm" else "q35"
    argv = [
        qemu, "-name", "dsec", "-M", machine_opt,
        "-accel", machine.accel, "-cpu", "host" if machine.accel == "kvm" else "max",
        "-m", str(machine.memory_mb), "-smp", str(machine.cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", machine.kernel, "-initrd", machine.initrd, "-append", machine.cmdline,
        "-serial", f"file:{state_dir / SERIAL_LOG}",
        "-qmp", f"unix:{state_dir / QMP_SOCKET},server=on,wait=off",
        "-pidfile", str(state_dir / PID_FILE),
        "-drive", f"id=root,if=none,format=qcow2,file={state_dir / DISK},discard=unmap",
        "-device", f"virtio-blk-{transport},drive=root",
        "-device", f"virtio-serial-{transport},max_ports=2",
        "-chardev", f"socket,id=agent,path={state_dir / AGENT_SOCKET}",
        "-device", "virtserialport,chardev=agent,name=dsec.agent",
        *volume_disks.qemu_args(machine.volumes, transport),
    ]
    if machine.nic:
        argv += nic_args(transport, tap=netns is not None)
    if incoming is not None:
        argv += ["-incoming", f"exec:cat {shlex.quote(str(incoming))}"]
    return argv


_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _launch(
    argv: list[str], log_path: Path, netns: Path | None = None, die_with_server: bool = True
) -> subprocess.Popen:
    """Start QEMU so that it dies with this process, even on kill -9 (inside `netns` when given); with
    `die_with_server=False` it outlives a killed server, whose successor re-adopts or reaps it (server/readopt.py).

    `setpriv --pdeathsig KILL` makes the kernel kill QEMU when the *thread* that forked it ends, so every QEMU is
    forked by one long-lived spawner thread (it ends only with the process), never by a short-lived RPC thread.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsec-qemu-spawner")

    enter = ["nsenter", f"--net={netns}", "--"] if netns is not None else []
    tie = ["setpriv", "--pdeathsig", "KILL", "--"] if die_with_server else []

    def start() -> subprocess.Popen:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                [*tie, *enter, *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
            )

    return _spawner.submit(start).result()


class QemuProcess:
    """A running QEMU plus its monitor and the host end of the agent's serial port."""

    def __init__(
        self, qemu: str, machine: MachineSpec, state_dir: Path, incoming: Path | None, start_timeout_s: float,
        netns: Path | None = None, die_with_server: bool = True,
    ) -> None:
        self.machine = machine
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        agent_path = state_dir / AGENT_SOCKET
        with contextlib.suppress(FileNotFoundError):
            agent_path.unlink()
        listener.bind(str(agent_path))
        listener.listen(1)
        argv = qemu_argv(qemu, machine, state_dir, incoming, netns)
        self.proc: subprocess.Popen | _AdoptedProc = _launch(argv, state_dir / QEMU_LOG, netns, die_with_server)
        (state_dir / PID_FILE).write_text(str(self.proc.pid))
        try:
            self.agent_socket = self._accept(listener, start_timeout_s)
            self.qmp = QmpClient(state_dir / QMP_SOCKET, timeout_s=start_timeout_s)
        except BaseException:
            self.kill()
            raise
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                agent_path.unlink()

    @classmethod
    def adopt(cls, machine: MachineSpec, state_dir: Path, timeout_s: float) -> QemuProcess:
        """Re-attach the QEMU a dead server left running in `state_dir`: a new QMP connection, and the agent's
        serial port re-pointed (QMP `chardev-change`) at a new host socket, since its old connection died with
        that server (the guest agent then drops that stream's processes and reopens the port). A stopped guest is
        continued first: QEMU detaches a serial port's backend while the guest is stopped, and refuses to swap it."""
        self = cls.__new__(cls)
        self.machine = machine
        self.state_dir = state_dir
        self.proc = _AdoptedProc.of(state_dir)
        self.qmp = QmpClient(state_dir / QMP_SOCKET, timeout_s=timeout_s)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        agent_path = state_dir / AGENT_SOCKET
        try:
            if self.qmp.execute("query-status")["status"] != "running":
                self.qmp.execute("cont")
            with contextlib.suppress(FileNotFoundError):
                agent_path.unlink()
            listener.bind(str(agent_path))
            listener.listen(1)
            self.qmp.execute("chardev-change", id="agent", backend={"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": str(agent_path)}}, "server": False}})
            self.agent_socket = self._accept(listener, timeout_s)
        except BaseException:
            self.qmp.close()
            raise
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                agent_path.unlink()
        return self

    @classmethod
    def exited(cls, machine: MachineSpec, state_dir: Path) -> QemuProcess:
        """The QEMU of a memory-paused sandbox a dead server left: none runs (its state is in a file), so this
        only names the machine and its files until a resume starts a new one."""
        self = cls.__new__(cls)
        self.machine = machine
        self.state_dir = state_dir
        self.proc = _AdoptedProc(0, state_dir)
        self.proc.returncode = -signal.SIGKILL
        return self

    def _accept(self, listener: socket.socket, timeout_s: float) -> socket.socket:
        deadline = time.monotonic() + timeout_s
        listener.settimeout(0.05)
        while True:
            try:
                conn, _ = listener.accept()
                conn.settimeout(None)
                return conn
            except TimeoutError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeFailure(f"QEMU exited ({self.proc.returncode}) at start: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeFailure(f"QEMU did not connect the agent port within {timeout_s:.0f}s: {self.log_tail()}")

    def log_tail(self, limit: int = 600) -> str:
        text = ""
        for name in (QEMU_LOG, SERIAL_LOG):
            with contextlib.suppress(OSError):
                text += (self.state_dir / name).read_bytes()[-limit:].decode(errors="replace")
        return " | ".join(line for line in text.splitlines() if line.strip())[-limit:] or "(no output)"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def finish_incoming(self, timeout_s: float) -> None:
        """Wait for the restore to load, then run the guest (it was saved stopped, so it arrives paused)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.qmp.execute("query-status")["status"]
            if status in ("paused", "postmigrate", "prelaunch"):
                self.qmp.execute("cont")
                return
            if status == "running":
                return
            if status != "inmigrate":
                raise RuntimeFailure(f"QEMU restore ended in state {status!r}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeFailure(f"QEMU restore did not finish within {timeout_s:.0f}s: {self.log_tail()}")
            time.sleep(0.005)

    def save(self, dest_state: Path, timeout_s: float) -> None:
        """Stop the guest and write its device + memory state to `dest_state` (the guest stays stopped)."""
        self.qmp.execute("stop")
        self.qmp.execute("migrate", uri=f"exec:cat > {shlex.quote(str(dest_state))}")
        self.qmp.wait_migration(timeout_s)

    def kill(self) -> None:
        """SIGKILL the QEMU (its whole session) and reap it; the state directory's files stay."""
        with contextlib.suppress(AttributeError):
            self.qmp.close()
        with contextlib.suppress(AttributeError, OSError):
            self.agent_socket.close()
        if isinstance(self.proc, subprocess.Popen):  # an adopted QEMU is killed by pid after checking it is ours
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class _AdoptedProc:
    """The `Popen` surface QemuProcess uses, for a QEMU this server did not start (it is not our child: the
    kernel reaps it once killed, so "gone" is: its pid no longer runs a QEMU of this state directory)."""

    def __init__(self, pid: int, state_dir: Path) -> None:
        self.pid = pid
        self.state_dir = state_dir
        self.returncode: int | None = None

    @classmethod
    def of(cls, state_dir: Path) -> _AdoptedProc:
        try:
            pid = int((state_dir / PID_FILE).read_text().strip())
        except (OSError, ValueError) as exc:
            raise RuntimeFailure(f"no QEMU pid recorded in {state_dir}: {exc}") from exc
        proc = cls(pid, state_dir)
        if proc.poll() is not None:
            raise RuntimeFailure(f"the QEMU of {state_dir} (pid {pid}) is gone")
        return proc

    def poll(self) -> int | None:
        if self.returncode is None and not _cmdline_mentions(self.pid, self.state_dir):
            self.returncode = -signal.SIGKILL
        return self.returncode

    def wait(self) -> int:
        kill_from_state_dir(self.state_dir)  # waits until it is gone
        self.returncode = -signal.SIGKILL
        return self.returncode


def _cmdline_mentions(pid: int, state_dir: Path) -> bool:
    try:
        return str(state_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def kill_from_state_dir(state_dir: Path, timeout_s: float = 10.0) -> None:
    """Kill the QEMU recorded in `state_dir` (if it is still that QEMU) and wait until it is gone."""
    try:
        pid = int((state_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return
    if not _cmdline_mentions(pid, state_dir):
        return  # gone already, or the pid was reused by an unrelated process
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while _cmdline_mentions(pid, state_dir) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)
    if _cmdline_mentions(pid, state_dir):
        raise RuntimeFailure(f"QEMU pid {pid} of {state_dir} survived SIGKILL for {timeout_s:.0f}s")
