"""The on-demand build: compiled once, reused while the source is unchanged, concurrent callers compile once."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from dsec.agent import build

pytestmark = pytest.mark.timeout(300)


def test_build_is_cached_and_concurrent_safe(tmp_path) -> None:
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(build.agent_binary, [tmp_path] * 4))
    assert paths == [tmp_path / "dsec-agent"] * 4
    mtime = paths[0].stat().st_mtime_ns
    assert build.agent_binary(tmp_path).stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    assert paths[0].read_bytes()[:4] == b"\x7fELF"
    headers = subprocess.run(["readelf", "-l", str(paths[0])], capture_output=True, text=True, check=True).stdout
    assert "INTERP" not in headers, "the agent must be static: images may have no libc"


def test_stale_stamp_triggers_a_rebuild(tmp_path) -> None:
    binary = build.agent_binary(tmp_path)
    (tmp_path / ".dsec-agent.sha256").write_text("stale\n")
    binary.write_bytes(b"not an agent")
    assert build.agent_binary(tmp_path).read_bytes()[:4] == b"\x7fELF"


def test_module_prints_the_path(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dsec.agent.build", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == str(tmp_path / "dsec-agent")
