"""The HTTP front door's cost: the unchanged e2b and sandbox-fusion clients against dsec's own SDK and Docker.

  e2b_create_run_kill_p50_ms  `Sandbox.create("base")` + `commands.run("true")` + `kill()` through the e2b SDK
                              (control API + envd on the front door).
  e2b_over_native             that p50 over the same create + exec `true` + destroy of the same image through dsec's
                              SDK (gRPC): what the door adds (target <= 1.5).
  e2b_vs_docker_run           `docker run --rm IMAGE true` p50 (docker SDK, dsec's Docker Engine, the same image's
                              root) over the e2b p50 (> 1 means the e2b path through dsec is faster; target >= 3).
  fusion_run_code_p50_ms      `sandbox_fusion.run_code` of `print(1)` in python.
Every sandbox has no network (e2b: allow_internet_access=False) so all contenders do the same work. Contenders run
interleaved, one sample each per round, so other load on the machine hits them alike. The last line is key=value.

Usage: .venv/bin/python -m bench.compat [--n 30] [--fusion-n 30]
"""

from __future__ import annotations

import argparse
import os
import sys

import docker

import dsec
from dsec.sdk.embedded import EmbeddedServer
from dsec.substrates.container.dockerd import ensure_engine

from bench.harness import interleaved, report
from bench.sandbox_latency import docker_tag_of

IMAGE = "base"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=30, help="rounds of create + run + kill per contender")
    parser.add_argument("--fusion-n", type=int, default=30, help="run_code calls")
    args = parser.parse_args()

    server = EmbeddedServer.start(http_listen="127.0.0.1:0")
    url = server.http_url
    assert url
    os.environ.update({"E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": "e2b_bench"})
    os.environ.pop("E2B_DEBUG", None)
    from e2b import Sandbox
    from sandbox_fusion import RunCodeRequest, run_code

    client = dsec.Client(server.address)
    engine = docker.DockerClient(base_url=ensure_engine(), version="auto", timeout=120)
    try:
        tag = docker_tag_of(IMAGE, engine)

        def e2b_once() -> None:
            sb = Sandbox.create(IMAGE, timeout=120, allow_internet_access=False)
            try:
                sb.commands.run("true")
            finally:
                sb.kill()

        def native_once() -> None:
            sb = client.create(IMAGE, "container", timeout_s=120)
            try:
                sb.exec(["true"])
            finally:
                sb.destroy()

        create = interleaved("create + run true + kill", {
            "e2b SDK (HTTP door)": e2b_once,
            "dsec SDK (gRPC)": native_once,
            "docker run --rm": lambda: engine.containers.run(tag, ["true"], remove=True, network_mode="none"),
        }, args.n)  # fmt: skip

        def fusion_once() -> None:
            reply = run_code(RunCodeRequest(code="print(1)", language="python"), endpoint=url, max_attempts=1)
            if reply.status.value != "Success" or reply.run_result.stdout.strip() != "1":
                raise RuntimeError(f"run_code failed: {reply}")

        fusion = interleaved("sandbox_fusion run_code print(1)", {"run_code": fusion_once}, args.fusion_n)
    finally:
        client.close()
        engine.close()
        server.stop()

    e2b = create["e2b SDK (HTTP door)"]["p50"]
    report({
        "e2b_create_run_kill_p50_ms": f"{e2b:.1f}",
        "e2b_over_native": f"{e2b / create['dsec SDK (gRPC)']['p50']:.2f}",
        "e2b_vs_docker_run": f"{create['docker run --rm']['p50'] / e2b:.1f}",
        "fusion_run_code_p50_ms": f"{fusion['run_code']['p50']:.1f}",
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
