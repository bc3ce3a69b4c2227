"""The sandbox half of `make demo`: an embedded server, a container and a function sandbox, the unchanged e2b SDK
on the same server's HTTP front door (docs/compat.md), timings.

Run: `.venv/bin/python -m dsec.demo` (after `make setup`).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dsec


def _timed(label: str, timings: dict[str, float], fn, *args, **kwargs):
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    timings[label] = (time.perf_counter() - started) * 1000
    return value


def collatz_steps(n: int) -> int:
    """Runs inside the function sandbox (pickled by value)."""
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def main() -> int:
    timings: dict[str, float] = {}
    print("dsec demo: starting an embedded server (no DSEC_ADDRESS given)…", flush=True)
    client = _timed("embedded server start", timings, dsec.Client, http_listen="127.0.0.1:0")
    print(f"  server at {client.address}")

    print("\n[1/4] container sandbox (image busybox, OCI runtime)")
    sb = _timed("container create", timings, client.create, "busybox", "container", memory_mb=256, labels={"demo": "1"})
    print(f"  created {sb.id} with driver {sb.info.driver}")
    result = _timed("exec (first)", timings, sb.exec, "echo hello from $(hostname); uname -s")
    print("  exec →", result.text.strip().replace("\n", " | "))
    samples = []
    for _ in range(20):
        started = time.perf_counter()
        sb.exec(["true"])
        samples.append((time.perf_counter() - started) * 1000)
    timings["exec round trip (p50 of 20)"] = statistics.median(samples)
    streamed: list[bytes] = []
    sb.exec("for i in 1 2 3; do echo tick $i; sleep 0.1; done", on_stdout=streamed.append)
    print(f"  streamed {len(streamed)} stdout chunks as they arrived")
    timed_out = sb.exec("echo partial; sleep 10", timeout=0.5)
    print(f"  timeout honoured: timed_out={timed_out.timed_out}, output kept={timed_out.text.strip()!r}")
    sb.files.write("/work/notes.txt", "written through the SDK\n")
    print("  files.read →", sb.files.read("/work/notes.txt").decode().strip())
    print("  files.list(/work) →", [entry.name for entry in sb.files.list("/work")])
    with sb.session() as shell:
        shell.run("cd /work && export GREETING=hi")
        print("  session keeps cwd+env →", shell.run("echo $PWD $GREETING").text.strip())
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "project").mkdir()
        (Path(tmp) / "project" / "main.py").write_text("print('uploaded')\n")
        sb.upload(Path(tmp) / "project", "/work")
        back = sb.download("/work/project", Path(tmp) / "back")
        print("  upload + download round trip →", sorted(p.name for p in back.iterdir()))
    _timed("container destroy", timings, sb.destroy)

    print("\n[2/4] function sandbox (image python, warm pre-forked worker)")
    fn_sb = _timed("function create", timings, client.create, "python", "function")
    value = _timed("function call (first)", timings, fn_sb.call, collatz_steps, 27)
    print(f"  collatz_steps(27) computed in the sandbox = {value}")
    samples = []
    for n in range(20):
        started = time.perf_counter()
        fn_sb.call(collatz_steps, 97 + n)
        samples.append((time.perf_counter() - started) * 1000)
    timings["function call (p50 of 20)"] = statistics.median(samples)
    try:
        fn_sb.call(int, "not a number")
    except ValueError as error:
        print(f"  remote exception re-raised locally: ValueError({error})")
    _timed("function destroy", timings, fn_sb.destroy)

    print("\n[3/4] typed errors")
    try:
        client.create("no-such-image")
    except dsec.ImageNotFound as error:
        print(f"  ImageNotFound: {str(error)[:80]}")
    try:
        client.connect("sb-0000000000000000")
    except dsec.SandboxNotFound as error:
        print(f"  SandboxNotFound: {error}")

    _e2b_demo(client, timings)

    print("\ntimings (ms):")
    for label, value in timings.items():
        print(f"  {label:<32} {value:9.2f}")
    client.close()
    return 0


def _e2b_demo(client: dsec.Client, timings: dict[str, float]) -> None:
    """The e2b SDK from PyPI, unchanged, pointed at the embedded server by its two environment variables."""
    url = client._embedded.http_url if client._embedded else None
    try:
        from e2b import Sandbox
    except ImportError:
        print("\n[4/4] e2b SDK: not installed (pip install -e '.[test]'); skipped")
        return
    if url is None:
        print("\n[4/4] e2b SDK: this server has no HTTP front door; skipped")
        return
    print(f"\n[4/4] the unchanged e2b SDK: E2B_API_URL=E2B_SANDBOX_URL={url}")
    os.environ.update({"E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": os.environ.get("E2B_API_KEY", "demo")})
    sb = _timed("e2b Sandbox.create", timings, Sandbox.create, "base", timeout=120, metadata={"demo": "e2b"})
    print(f"  Sandbox.create('base') → {sb.sandbox_id} (a dsec container: {client.connect(sb.sandbox_id).info.driver})")
    run = _timed("e2b commands.run", timings, sb.commands.run, "echo hello from $(whoami) in $PWD; python3 --version")
    print("  commands.run →", run.stdout.strip().replace("\n", " | "))
    sb.files.write("/home/user/hello.txt", "written by the e2b SDK")
    print("  files.read →", sb.files.read("/home/user/hello.txt"))
    print("  Sandbox.list(metadata demo=e2b) →", [s.sandbox_id for s in Sandbox.list().next_items() if s.metadata.get("demo") == "e2b"])
    _timed("e2b kill", timings, sb.kill)


if __name__ == "__main__":
    sys.exit(main())
