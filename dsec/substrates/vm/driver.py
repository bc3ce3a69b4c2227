"""The QEMU drivers of the microvm (`-M microvm`) and vm (q35) substrates.

A sandbox is one QEMU process whose files all live in the sandbox's state directory: `disk.qcow2` (its private
copy-on-write layer over the image's shared raw disk), `qemu.pid`, the monitor socket and the console log.
`create` restores the image's template snapshot (booted once, see template.py) rather than booting; the guest
agent (the same static `dsec-agent` containers run) serves exec, sessions and files over virtio-serial.

Snapshot = stop the guest, QMP `migrate` its memory + device state to a file, copy its disk overlay, continue.
Restore = a QEMU with the same device model started with `-incoming` on that file, over a copy of that overlay.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dsec.agent.client import AgentClient
from dsec.config import ServerConfig
from dsec.errors import DiskFull, DsecError, InvalidSpec, RuntimeFailure, SandboxStateError, SnapshotNotFound, Unsupported
from dsec.models import PauseKind, SandboxSpec
from dsec.substrates.agent_sandbox import AgentSandbox
from dsec.substrates.base import DriverSandbox, ImageRootfs, SandboxDriver, Usage, snapshot_target_full
from dsec.substrates.container import network
from dsec.substrates.vm.accel import host_accel
from dsec.substrates.vm.config import VmConfig
from dsec.substrates.vm import volumes as volume_disks
from dsec.substrates.vm.disk import copy_overlay, create_overlay, image_disk
from dsec.substrates.vm.guest import GuestBoot, guest_boot
from dsec.substrates.vm.machine import (
    AGENT_SOCKET,
    DISK,
    PID_FILE,
    QEMU_LOG,
    QMP_SOCKET,
    SERIAL_LOG,
    MachineKind,
    MachineSpec,
    QemuProcess,
    guest_cmdline,
    kill_from_state_dir,
)
from dsec.substrates.vm.net import connect_vm, guest_net_cmdline
from dsec.substrates.vm.template import STATE, ensure_template

SNAPSHOT_META = "meta.json"
PAUSED_STATE = "paused.state"  # a memory pause's saved guest (QEMU's migration stream)
SAVE_TIMEOUT_S = 120.0
# Hard links to the image disk and the initrd, so a snapshot outlives cache cleanups of either.
SNAPSHOT_BASE = "base.raw"
SNAPSHOT_INITRD = "initrd.img"
MACHINE_RECORD = "vm.json"  # the machine and base disk of a running sandbox, for re-adoption after a restart
SERVER_ID = re.compile(r"sb-[0-9a-f]{16}")  # ids servers mint (SandboxManager._new_id; orphans.SANDBOX_ID)
ADOPT_PROBE_S = 10.0  # QMP, the serial port's new connection and the agent's ping must all answer within this
OWN_FILES = (
    DISK, PID_FILE, QMP_SOCKET, AGENT_SOCKET, SERIAL_LOG, QEMU_LOG, MACHINE_RECORD, PAUSED_STATE, network.HOSTS_NAME,
)


def _vmstat_oom_kills(text: str) -> int:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill":
            return int(value)
    return -1


USER_HZ = 100  # the unit of /proc/stat on Linux (sysconf(_SC_CLK_TCK)) whatever the kernel's HZ


def _guest_cpu_seconds(stat: str) -> float:
    """Busy CPU time from /proc/stat's first line: user nice system idle iowait irq softirq steal…"""
    for line in stat.splitlines():
        if line.startswith("cpu "):
            fields = [int(v) for v in line.split()[1:] if v.isdigit()]
            busy = sum(fields[:3]) + sum(fields[5:8])  # not idle (3) nor iowait (4)
            return busy / USER_HZ
    return 0.0


def _meminfo_kb(meminfo: str, key: str) -> int:
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            value = rest.split()
            return int(value[0]) if value and value[0].isdigit() else 0
    return 0


class VmSandbox(AgentSandbox):
    """A running QEMU machine whose guest agent serves this sandbox."""

    def __init__(
        self, sandbox_id: str, client: AgentClient, process: QemuProcess, base_disk: Path, restore_s: float,
        relaunch: Callable[[Path], QemuProcess],
    ) -> None:
        super().__init__(sandbox_id, client)
        self.process = process
        self.relaunch = relaunch  # a QEMU of this machine, in its netns, restoring the given state file
        self.base_disk = base_disk
        self.accel = process.machine.accel
        self.start_s = restore_s
        self._paused = False
        self.saved: Path | None = None  # paused keeping memory on disk: the state file; no QEMU runs meanwhile
        self._qmp_lock = threading.Lock()

    @property
    def machine(self) -> MachineSpec:
        return self.process.machine

    def memory_limit_mb(self) -> int:
        return self.machine.memory_mb

    def oom_kill_count(self) -> int:
        """The guest kernel's OOM kill counter (the agent is PID 1, which the OOM killer never picks)."""
        try:
            return _vmstat_oom_kills(b"".join(self.read_file("/proc/vmstat")).decode())
        except DsecError:
            return -1

    def usage(self) -> Usage:
        """From the guest kernel's own counters (/proc/stat, /proc/meminfo): the host only sees QEMU's RSS, which
        counts guest memory once touched and never gives it back. The guest disk's fill is not measured here."""
        if self._paused:
            raise SandboxStateError(f"sandbox {self.sandbox_id} is paused: its guest cannot report usage; resume it first")
        stat = b"".join(self.read_file("/proc/stat")).decode()
        meminfo = b"".join(self.read_file("/proc/meminfo")).decode()
        return Usage(
            cpu_seconds=_guest_cpu_seconds(stat),
            cpu_limit=float(self.machine.cpus),
            mem_used_bytes=max(0, _meminfo_kb(meminfo, "MemTotal") - _meminfo_kb(meminfo, "MemAvailable")) * 1024,
            mem_total_bytes=_meminfo_kb(meminfo, "MemTotal") * 1024,
            mem_cache_bytes=_meminfo_kb(meminfo, "Cached") * 1024,
        )

    def _qmp(self, command: str) -> None:
        if not self.process.alive():
            raise SandboxStateError(f"the VM of sandbox {self.sandbox_id} is not running (QEMU exited); recreate it")
        with self._qmp_lock:
            self.process.qmp.execute(command)

    def check_pause(self, kind: PauseKind) -> None:
        if kind == "files":
            raise Unsupported(
                f"pause(memory=False) of VM sandbox {self.sandbox_id}: a guest's files are half in its kernel's page "
                "cache, so a VM pauses keeping memory (pause(memory=True)) or frozen in place (pause())",
                sandbox_id=self.sandbox_id,
            )

    def keeps_streams(self, kind: PauseKind) -> bool:
        """The guest never sees its agent port go (QEMU connects to the host, see machine.py), and the host's
        client detaches and re-attaches around a memory pause, so sessions and process streams carry on."""
        return kind in ("freeze", "memory")

    def pause(self, kind: PauseKind = "freeze") -> None:
        """freeze: every vCPU stopped, RAM held. memory: the guest's memory and devices are migrated to a file
        in the state directory and QEMU exits (no CPU, no RAM held); disk overlay and network namespace stay."""
        self.check_pause(kind)
        if kind == "freeze":
            self._qmp("stop")
            self._paused = True
            return
        if not self.process.alive():
            raise SandboxStateError(f"the VM of sandbox {self.sandbox_id} is not running (QEMU exited); recreate it")
        saved = self.process.state_dir / PAUSED_STATE
        with self._qmp_lock:
            try:
                self.process.save(saved, timeout_s=SAVE_TIMEOUT_S)
            except BaseException:
                if self.process.alive():
                    self.process.qmp.execute("cont")
                with contextlib.suppress(FileNotFoundError):
                    saved.unlink()
                raise
            self.client.detach()
            self.process.kill()
        self.saved = saved
        self._paused = True

    def resume(self) -> None:
        if self.saved is None:
            self._qmp("cont")
            self._paused = False
            return
        process = self.relaunch(self.saved)
        self.client.attach(process.agent_socket)
        try:
            process.finish_incoming(SAVE_TIMEOUT_S)
            self.client.ping(timeout=SAVE_TIMEOUT_S)
        except BaseException:
            self.client.detach()
            process.kill()  # the state file stays: the sandbox is still paused and may be resumed again
            raise
        self.process = process
        self.saved.unlink()
        self.saved = None
        self._paused = False

    def snapshot(self, dest: Path) -> str:
        """Save memory + devices + disk into `dest`; the sandbox continues (or stays paused) afterwards."""
        if not self.process.alive():
            raise SandboxStateError(f"the VM of sandbox {self.sandbox_id} is not running; cannot snapshot it")
        if self.machine.volumes:  # its memory holds the volumes' mounted filesystems, which live on and change
            raise Unsupported(
                f"sandbox {self.sandbox_id} has named volumes: a VM snapshot would restore their filesystems' cached "
                "state over volumes written since; snapshot a VM without volumes", sandbox_id=self.sandbox_id)
        dest.mkdir(parents=True, exist_ok=True)
        with self._qmp_lock:
            try:
                self.process.save(dest / STATE, timeout_s=SAVE_TIMEOUT_S)
                copy_overlay(self.process.state_dir / DISK, dest / DISK)
            except (RuntimeFailure, OSError) as exc:
                if snapshot_target_full(dest):  # QEMU says only "migrate failed" when its state file hit ENOSPC
                    raise DiskFull(
                        f"snapshot of sandbox {self.sandbox_id}: no space left in {dest}: free space or delete snapshots",
                        sandbox_id=self.sandbox_id,
                    ) from exc
                raise
            finally:
                if not self._paused and self.process.alive():
                    self.process.qmp.execute("cont")
        for source, name in ((self.base_disk, SNAPSHOT_BASE), (Path(self.machine.initrd), SNAPSHOT_INITRD)):
            with contextlib.suppress(OSError):
                os.link(source, dest / name)
        meta = {"machine": self.machine.to_dict(), "base_disk": str(self.base_disk), "sandbox_id": self.sandbox_id}
        (dest / SNAPSHOT_META).write_text(json.dumps(meta))
        return "memory+disk"


class QemuDriver(SandboxDriver):
    """One QEMU machine kind; `vm_driver` names the two instances."""

    def __init__(self, kind: MachineKind, config: ServerConfig) -> None:
        self.kind = kind
        self.cfg = VmConfig.from_server(config)
        self.server_config = config
        self._accel: str | None = None
        self._boot: GuestBoot | None = None
        self._boot_lock = threading.Lock()

    @property
    def accel(self) -> str:
        """The accelerator every sandbox of this host uses (probed once per host, see accel.py)."""
        if self._accel is None:
            self._accel = host_accel(self.cfg)
        return self._accel

    def boot(self) -> GuestBoot:
        """Kernel + initrd, built or found once per driver (hashing the initrd on every create costs ~0.3 s)."""
        with self._boot_lock:
            if self._boot is None:
                self._boot = guest_boot(self.cfg)
            return self._boot

    def machine_for(self, spec: SandboxSpec) -> MachineSpec:
        if spec.network:
            raise Unsupported(
                f"{self.substrate} sandboxes have no host network; create it with network=False, or list what it may "
                "reach in network_allow"
            )
        accel = self.accel
        if spec.driver in ("kvm", "tcg") and spec.driver != accel:
            raise InvalidSpec(f"accelerator {spec.driver!r} was asked for but this host uses {accel!r} (KVM probe)")
        boot = self.boot()
        nic = bool(spec.network_allow)
        cmdline = guest_cmdline(self.cfg.kernel_cmdline, accel)
        if spec.volumes:
            cmdline = f"{cmdline} {volume_disks.guest_cmdline(spec.volumes)}"
        return MachineSpec(
            kind=self.kind,
            accel=accel,
            memory_mb=max(spec.resources.memory_mb, self.cfg.min_memory_mb),
            cpus=max(1, math.ceil(spec.resources.cpu)),
            kernel=str(boot.kernel.vmlinuz),
            initrd=str(boot.initrd),
            cmdline=f"{cmdline} {guest_net_cmdline()}" if nic else cmdline,
            nic=nic,
            volumes=volume_disks.disk_entries(spec.volumes, self.server_config.volumes_dir),
        )

    def create(self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, state_dir: Path) -> VmSandbox:
        machine = self.machine_for(spec)
        base = image_disk(image, self.cfg.disks_dir, spec.resources.disk_mb)
        if machine.volumes:  # no template's saved machine has these disks: this one boots
            return self._start(sandbox_id, spec, machine, None, None, base, state_dir)
        template = ensure_template(self.cfg, machine, base)
        return self._start(sandbox_id, spec, machine, template.state, template.disk, base, state_dir)

    def restore(self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, snapshot: Path, state_dir: Path) -> VmSandbox:
        try:
            meta = json.loads((snapshot / SNAPSHOT_META).read_text())
        except (OSError, ValueError) as exc:
            raise SnapshotNotFound(f"{snapshot} is not a VM snapshot ({exc}); take a new one with sb.snapshot()") from exc
        machine = MachineSpec(**meta["machine"])
        if machine.kind != self.kind:
            raise InvalidSpec(f"snapshot {snapshot.parent.name} is a {machine.kind} machine, not {self.kind}")
        if machine.nic != bool(spec.network_allow):
            raise InvalidSpec(
                f"snapshot {snapshot.parent.name} was taken {'with' if machine.nic else 'without'} a NIC; restore it "
                f"{'with' if machine.nic else 'without'} a network_allow list"
            )
        base = Path(meta["base_disk"])
        for path, name in ((base, SNAPSHOT_BASE), (Path(machine.initrd), SNAPSHOT_INITRD)):
            if not path.exists() and (snapshot / name).exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.link(snapshot / name, path)
        for needed in (base, Path(machine.kernel), Path(machine.initrd), snapshot / STATE, snapshot / DISK):
            if not needed.exists():
                raise SnapshotNotFound(f"snapshot {snapshot.parent.name} needs {needed}, which is gone; take a new snapshot")
        return self._start(sandbox_id, spec, machine, snapshot / STATE, snapshot / DISK, base, state_dir)

    def _start(
        self, sandbox_id: str, spec: SandboxSpec, machine: MachineSpec, state: Path | None, disk: Path | None, base: Path,
        state_dir: Path,
    ) -> VmSandbox:
        """Restore `state` over a copy of `disk`, or boot (both None) on a new overlay of `base`; an allowlisted
        machine runs in its own netns (see net.py)."""
        started = time.monotonic()
        state_dir.mkdir(parents=True, exist_ok=True)
        try:
            netns, hosts = connect_vm(sandbox_id, spec.network_allow, state_dir) if machine.nic else (None, None)
            if disk is None:
                create_overlay(base, state_dir / DISK)
            else:
                copy_overlay(disk, state_dir / DISK)
            (state_dir / MACHINE_RECORD).write_text(json.dumps({"machine": machine.to_dict(), "base_disk": str(base)}))
            wait_s = self.cfg.boot_timeout_s if state is None else self.cfg.restore_timeout_s
            process = QemuProcess(self.cfg.qemu, machine, state_dir, state, wait_s, netns,
                                  die_with_server=not self._adoptable(sandbox_id))
        except BaseException:
            network.teardown(state_dir)
            raise
        client = AgentClient(process.agent_socket, sandbox_id=sandbox_id)
        sandbox = VmSandbox(sandbox_id, client, process, base, 0.0, self._relauncher(sandbox_id, machine, state_dir))
        try:
            if state is not None:
                process.finish_incoming(self.cfg.restore_timeout_s)
            client.ping(timeout=wait_s)
            if hosts is not None:
                sandbox.write_file("/etc/hosts", [hosts.read_bytes()])
        except BaseException as exc:
            client.close()
            tail = process.log_tail()
            process.kill()
            network.teardown(state_dir)
            if isinstance(exc, DsecError):
                raise RuntimeFailure(f"VM {sandbox_id} did not come back from its snapshot: {exc.message}; {tail}") from exc
            raise
        sandbox.start_s = time.monotonic() - started
        return sandbox

    def adopt(self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, state_dir: Path, paused: bool) -> VmSandbox:
        """Re-attach a VM a dead server left running (started with readopt on, so it outlived that server): its QEMU
        must run, answer QMP and take the agent port's new connection, and the guest agent must answer a ping. A
        paused VM is continued for that (QemuProcess.adopt) and stopped again."""
        try:
            record = json.loads((state_dir / MACHINE_RECORD).read_text())
            machine = MachineSpec(**record["machine"])
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise RuntimeFailure(f"sandbox {sandbox_id} has no VM record in {state_dir} ({exc})") from exc
        if machine.kind != self.kind:
            raise RuntimeFailure(f"sandbox {sandbox_id} is a {machine.kind} machine, not {self.kind}")
        relaunch = self._relauncher(sandbox_id, machine, state_dir)
        if paused and (state_dir / PAUSED_STATE).exists():  # memory-paused: no QEMU runs; resume starts one
            process = QemuProcess.exited(machine, state_dir)
            sandbox = VmSandbox(sandbox_id, AgentClient.detached(sandbox_id), process, Path(record["base_disk"]), 0.0, relaunch)
            sandbox.saved, sandbox._paused = state_dir / PAUSED_STATE, True
            return sandbox
        process = QemuProcess.adopt(machine, state_dir, ADOPT_PROBE_S)
        client = AgentClient(process.agent_socket, sandbox_id=sandbox_id)
        sandbox = VmSandbox(sandbox_id, client, process, Path(record["base_disk"]), 0.0, relaunch)
        try:
            client.ping(timeout=ADOPT_PROBE_S)
            if paused:
                sandbox.pause()
        except BaseException:
            client.close()
            with contextlib.suppress(AttributeError, OSError):
                process.qmp.close()
            raise
        return sandbox

    def _relauncher(self, sandbox_id: str, machine: MachineSpec, state_dir: Path) -> Callable[[Path], QemuProcess]:
        """How a memory-paused sandbox gets its QEMU back: the same machine, files and netns, restoring a state."""
        netns = network.netns_path(sandbox_id) if machine.nic else None
        die_with_server = not self._adoptable(sandbox_id)

        def relaunch(state: Path) -> QemuProcess:
            return QemuProcess(self.cfg.qemu, machine, state_dir, state, self.cfg.restore_timeout_s, netns,
                               die_with_server=die_with_server)

        return relaunch

    def _adoptable(self, sandbox_id: str) -> bool:
        """Whether this QEMU may outlive a killed server: only with readopt on and for a server's id, the ones a
        successor re-adopts or its orphan sweep reaps; any other (a driver used without a server) dies with us."""
        return self.server_config.readopt and SERVER_ID.fullmatch(sandbox_id) is not None

    def destroy(self, sandbox: DriverSandbox) -> None:
        assert isinstance(sandbox, VmSandbox)
        sandbox.close()
        sandbox.process.kill()
        network.teardown(sandbox.process.state_dir)
        self._remove_files(sandbox.process.state_dir)

    def cleanup_state_dir(self, state_dir: Path) -> None:
        kill_from_state_dir(state_dir)
        network.teardown(state_dir)
        self._remove_files(state_dir)

    @staticmethod
    def _remove_files(state_dir: Path) -> None:
        for name in OWN_FILES:
            with contextlib.suppress(FileNotFoundError):
                (state_dir / name).unlink()


class MicroVmDriver(QemuDriver):
    name = "qemu-microvm"
    substrate = "microvm"

    def __init__(self, config: ServerConfig) -> None:
        super().__init__("microvm", config)


class Q35Driver(QemuDriver):
    name = "qemu-q35"
    substrate = "vm"

    def __init__(self, config: ServerConfig) -> None:
        super().__init__("q35", config)
