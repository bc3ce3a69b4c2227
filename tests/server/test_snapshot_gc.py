"""Snapshot GC (issue #20 point 7): a pass removes expired snapshots (ttl_s), snapshots of gone sandboxes beyond a
per-tenant budget (newest kept: `snapshot_keep` of them within `snapshot_max_bytes`) and fork temporaries of dead
servers; never a pinned (template) snapshot, one a restore is reading, one of a live sandbox, or another tenant's.
Every pass here is called directly (the background thread runs the same one), with `now` where time matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dsec
from dsec.config import ServerConfig
from dsec.errors import SnapshotNotFound
from dsec.server.main import serve
from dsec.server.snapshot_gc import SnapshotGC
from dsec.server.snapshots import TEMPORARY, SnapshotStore
from dsec.substrates.vm.config import VmConfig
from dsec.substrates.vm import portable
from dsec.substrates.vm.pulled_gc import PULLED_GRACE_S

pytestmark = pytest.mark.timeout(600)

KB = 1024
TOKENS = {"gc-alice": "tok-gc-alice-1", "gc-bob": "tok-gc-bob-2"}


def _snapshot(store: SnapshotStore, sandbox_id: str, created_at: float, size: int = 4 * KB, tenant: str = "a",
              expires_at: float = 0.0) -> str:
    snapshot_id, data = store.new()
    data.mkdir()
    (data / "blob").write_bytes(os.urandom(size))
    store.publish(snapshot_id, {"snapshot_id": snapshot_id, "sandbox_id": sandbox_id, "name": "", "kind": "filesystem",
                                "created_at": created_at, "spec": {}, "image": "", "tenant": tenant,
                                "expires_at": expires_at})
    return snapshot_id


def _ids(store: SnapshotStore, tenant: str | None = None) -> set[str]:
    return {m["snapshot_id"] for m in store.list(tenant, "default")}


def _collect(store: SnapshotStore, keep: int = 100, max_bytes: int = 1 << 40, pinned: frozenset = frozenset(),
             alive=lambda sandbox_id: sandbox_id.startswith("live"), tenant: str | None = "a",
             now: float | None = None) -> dict[str, str]:
    removed = store.collect(time.time() if now is None else now, keep, max_bytes, set(pinned), alive, tenant, "default")
    return {r["snapshot_id"]: r["reason"] for r in removed}


def test_budget_keeps_the_newest_of_gone_sandboxes_per_tenant(tmp_path: Path):
    store = SnapshotStore(tmp_path / "snapshots")
    gone = [_snapshot(store, "gone-1", created_at=i, size=64 * KB) for i in range(4)]  # oldest first
    live = _snapshot(store, "live-1", created_at=0, size=64 * KB)
    others = _snapshot(store, "gone-2", created_at=0, tenant="b")

    assert _collect(store, keep=2) == {gone[0]: "over_count", gone[1]: "over_count"}
    assert _ids(store) == {gone[2], gone[3], live, others}
    # a byte budget for one of them: the newest stays, the next is over it
    assert _collect(store, keep=2, max_bytes=100 * KB) == {gone[2]: "over_bytes"}
    assert _collect(store, keep=0) == {gone[3]: "over_count"}
    assert _ids(store) == {live, others}  # a live sandbox's snapshot and another tenant's are not in the budget
    assert not (store.root / gone[0]).exists()


def test_expired_pinned_and_read_snapshots(tmp_path: Path):
    store = SnapshotStore(tmp_path / "snapshots")
    now = time.time()
    expiring = _snapshot(store, "live-1", created_at=1, expires_at=now + 3600)
    pinned = _snapshot(store, "gone-1", created_at=2, expires_at=now + 1)
    read = _snapshot(store, "gone-1", created_at=3)

    assert _collect(store, pinned=frozenset({pinned}), now=now) == {}  # not expired yet; the budget holds
    with store.reading(read):  # a restore in flight: the GC leaves it alone
        assert _collect(store, keep=0, pinned=frozenset({pinned}), now=now + 3601) == {expiring: "expired"}
        assert (store.root / read / "data" / "blob").exists()
    assert _collect(store, keep=0, pinned=frozenset({pinned}), now=now + 3601) == {read: "over_count"}
    assert _ids(store) == {pinned}  # expired and past the budget, but a template stands on it
    with pytest.raises(SnapshotNotFound):
        store.meta(read, None, "default")


def test_fork_temporaries_of_dead_servers_are_collected(tmp_path: Path):
    dead_run = tmp_path / "run" / "dead-server"
    dead_run.mkdir(parents=True)  # no server.lock held: its server is gone
    store = SnapshotStore(tmp_path / "snapshots", owner=dead_run)
    snapshot_id, data = store.new(temporary=True)
    data.mkdir()
    store.publish(snapshot_id, {"snapshot_id": snapshot_id, "sandbox_id": "live-1", "created_at": 0, "kind": "x",
                                "tenant": "a"})
    kept = _snapshot(store, "live-2", created_at=0)
    gc = SnapshotGC(store, ServerConfig(home=tmp_path, snapshot_gc_interval_s=0), lambda: set(),
                    lambda s: s.startswith("live"), "default")
    assert (store.root / snapshot_id / TEMPORARY).exists()
    assert gc.collect("b") == []  # another tenant's pass: the leftover goes but is not reported to b
    assert not (store.root / snapshot_id).exists()
    snapshot_id, data = store.new(temporary=True)
    data.mkdir()
    store.publish(snapshot_id, {"snapshot_id": snapshot_id, "sandbox_id": "live-1", "created_at": 0, "kind": "x",
                                "tenant": "a"})
    assert gc.collect("a") == [{"snapshot_id": snapshot_id, "reason": "fork_leftover", "size_bytes": 0}]
    assert _ids(store) == {kept}


@pytest.fixture(scope="module")
def server():
    running = serve(ServerConfig(listen="127.0.0.1:0", snapshot_keep=1, snapshot_gc_interval_s=0,
                                 tokens=",".join(f"{t}:{n}" for n, t in TOKENS.items())))
    yield running
    running.stop()


def test_gc_through_the_server_sdk_and_cli(server):
    alice = dsec.Client(server.address, token=TOKENS["gc-alice"])
    bob = dsec.Client(server.address, token=TOKENS["gc-bob"])
    try:
        with bob.create("busybox") as sandbox:
            bobs = sandbox.snapshot("bob")
        sandbox = alice.create("busybox")
        first, second = sandbox.snapshot("first"), sandbox.snapshot("second")
        expiring = sandbox.snapshot("expiring", ttl_s=3600)
        [ref] = [s for s in alice.snapshots() if s.snapshot_id == expiring]
        assert 3590 < ref.expires_at - ref.created_at <= 3600

        assert not {first, second, expiring} & {r.snapshot_id for r in alice.snapshots_gc()}  # its sandbox lives
        removed = server.manager.snapshot_gc.collect("gc-alice", now=time.time() + 3601)
        assert {r["snapshot_id"]: r["reason"] for r in removed}.get(expiring) == "expired"

        name = f"gc-{os.getpid()}-{int(time.time())}"
        template = alice.templates.create(name, image="busybox", start=[], ready={"command": ["true"]})
        sandbox.destroy()
        reasons = {r.snapshot_id: r.reason for r in alice.snapshots_gc()}
        assert reasons.get(first) == "over_count" and second not in reasons  # keep = 1: the newest stays
        assert template.snapshot_id not in reasons  # pinned, though its builder is gone and the budget is full
        mine = {s.snapshot_id for s in alice.snapshots()}
        assert second in mine and template.snapshot_id in mine and first not in mine
        assert bobs in {s.snapshot_id for s in bob.snapshots()}  # alice's pass left bob's alone

        env = os.environ | {"DSEC_TOKEN": TOKENS["gc-alice"]}
        cli = subprocess.run([sys.executable, "-m", "dsec.cli", "--address", server.address, "snapshots", "gc"],
                             capture_output=True, text=True, env=env, timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert "removed" in cli.stdout
        alice.templates.delete(name)
        assert template.snapshot_id not in {s.snapshot_id for s in alice.snapshots()}
    finally:
        for client in (alice, bob):
            for ref in client.snapshots():
                client.delete_snapshot(ref.snapshot_id)
            client.close()


def _vm_meta(path: Path, kernel: str = "/boot/vmlinuz", initrd: str = "/boot/initrd.img", base: str = "/x.raw") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": {"kind": "microvm", "kernel": kernel, "initrd": initrd}, "base_disk": base}))


def test_pulled_vm_files_go_once_no_snapshot_template_or_vm_names_them(tmp_path: Path):
    """A pulled VM snapshot links its kernel, initrd and base disk under vm/pulled (portable.localize); each pass
    keeps those a snapshot's meta.json, a VM template's or a VM sandbox's vm.json names (by inode, however the
    path is spelled), and removes the rest once their inode has been unchanged for the grace period."""
    config = ServerConfig(home=tmp_path, snapshot_gc_interval_s=0)
    store = SnapshotStore(tmp_path / "snapshots")
    gc = SnapshotGC(store, config, lambda: set(), lambda sandbox_id: True, "default")
    vm = VmConfig.from_server(config)
    pulled = vm.root / "pulled"
    pulled.mkdir(parents=True)
    files = {name: pulled / name for name in ("k.vmlinuz", "i.initrd.img", "b.base.raw", "t.base.raw", "orphan.base.raw")}
    for path in files.values():
        path.write_bytes(b"x")
    snapshot_id, data = store.new()
    _vm_meta(data / "meta.json", kernel=str(files["k.vmlinuz"]))
    store.publish(snapshot_id, {"snapshot_id": snapshot_id, "sandbox_id": "live-1", "created_at": 0, "kind": "vm",
                                "tenant": "a"})
    (tmp_path / "alias").symlink_to(vm.root)  # a VM record naming the file through another path still keeps it
    _vm_meta(config.run_root / "dead-server" / "sb-1" / "vm.json", initrd=str(tmp_path / "alias/pulled/i.initrd.img"),
             base=str(files["b.base.raw"]))
    _vm_meta(vm.templates_dir / "key" / "meta.json", base=str(files["t.base.raw"]))
    (config.run_root / "dead-server" / "sb-2").mkdir()
    (config.run_root / "dead-server" / "sb-2" / "vm.json").write_text("not json")  # names nothing, breaks nothing

    assert gc.collect_pulled_vm_files() == []  # inside the grace period nothing goes, named or not
    later = time.time() + PULLED_GRACE_S + 1
    assert gc.collect(now=later) == []  # not a snapshot: not in the pass's report
    assert sorted(p.name for p in pulled.iterdir()) == ["b.base.raw", "i.initrd.img", "k.vmlinuz", "t.base.raw"]

    store.discard(snapshot_id)  # its snapshot deleted, the kernel is next
    (config.run_root / "dead-server" / "sb-1" / "vm.json").unlink()  # the VM reaped
    assert sorted(p.name for p in gc.collect_pulled_vm_files(now=later)) == ["b.base.raw", "i.initrd.img", "k.vmlinuz"]
    assert [p.name for p in pulled.iterdir()] == ["t.base.raw"]


def test_a_pull_reusing_a_pulled_file_restarts_its_grace(tmp_path: Path):
    """A second pull of the same base disk finds it under vm/pulled and reuses it; until that pull writes the
    metadata naming it, only the grace keeps the GC off it, so reusing it restarts the grace."""
    source, dest = tmp_path / "base.raw", tmp_path / "pulled" / "id.base.raw"
    source.write_bytes(b"disk")
    portable._link(source, dest)
    first = dest.stat().st_ctime_ns
    time.sleep(0.05)
    portable._link(source, dest)
    assert dest.stat().st_ctime_ns > first and dest.read_bytes() == b"disk"
