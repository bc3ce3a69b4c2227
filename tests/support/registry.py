"""A real OCI distribution registry (Debian's docker-registry) on loopback, with its access log as ground truth."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.ports import free_port


@dataclass
class Registry:
    host: str
    root: Path  # its storage: blobs under data/docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data
    log: Path

    def count(self, pattern: str) -> int:
        """Access-log lines matching `pattern` (a regex over the request line and status)."""
        return len(re.findall(pattern, self.log.read_text(errors="replace")))

    def wait_count(self, pattern: str, at_least: int, timeout_s: float = 30.0) -> int:
        """The count once it reaches `at_least` (a line is logged just after its response is sent)."""
        deadline = time.monotonic() + timeout_s
        while (found := self.count(pattern)) < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(f"registry log: {found} lines match {pattern!r}, expected {at_least}")
            time.sleep(0.02)
        return found

    def manifest(self, repo: str, reference: str) -> dict:
        request = urllib.request.Request(f"http://{self.host}/v2/{repo}/manifests/{reference}",
                                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())

    def blob_file(self, digest: str) -> Path:
        hex_ = digest.removeprefix("sha256:")
        return self.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hex_[:2] / hex_ / "data"


@contextmanager
def running_registry(root: Path) -> Iterator[Registry]:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = root / "registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["/usr/bin/docker-registry", "serve", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield Registry(f"127.0.0.1:{port}", root, log)
    finally:
        proc.kill()
        proc.wait(10)
