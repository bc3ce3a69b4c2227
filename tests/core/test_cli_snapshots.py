"""`dsec snapshots ls/rm` against the session's server: what the SDK lists, the CLI prints and deletes."""

from __future__ import annotations

from dsec.cli import main


def test_snapshots_ls_and_rm(client, capsys):
    with client.create("busybox") as sandbox:
        snapshot_id = sandbox.snapshot("from-cli-test")
        assert main(["--address", client.address, "snapshots", "ls", "--sandbox", sandbox.id]) == 0
        listing = capsys.readouterr().out
        assert snapshot_id in listing and "from-cli-test" in listing
        assert main(["--address", client.address, "snapshots", "rm", snapshot_id]) == 0
        assert client.snapshots(sandbox.id) == []
        assert main(["--address", client.address, "snapshots", "rm", snapshot_id]) == 2  # typed error, exit 2
        assert "SnapshotNotFound" in capsys.readouterr().err
