"""dsec picks gRPC's iomgr path (dsec/grpc_io.py) in a process that imports dsec before grpc, keeps a value the
user set, and cannot change a grpc that is already imported; the installed grpcio knows the experiment names
(it logs "Unknown experiment" for one it does not). Each case runs in a fresh interpreter: grpc reads the
variable once, at import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dsec.grpc_io import GRPC_EXPERIMENTS, IOMGR_EXPERIMENTS

# a unary round trip over the chosen I/O path, then what the process saw
ROUND_TRIP = """
import json, os
{imports}
from concurrent import futures
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
    "t.Echo", {{"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request[::-1])}})])
port = server.add_insecure_port("127.0.0.1:0")
server.start()
with grpc.insecure_channel(f"127.0.0.1:{{port}}") as channel:
    reply = channel.unary_unary("/t.Echo/Echo")(b"abc", timeout=30)
server.stop(None)
print(json.dumps({{"reply": reply.decode(), "experiments": os.environ.get("{name}")}}))
"""


def _run(imports: str, env_value: str | None) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != GRPC_EXPERIMENTS}
    if env_value is not None:
        env[GRPC_EXPERIMENTS] = env_value
    done = subprocess.run([sys.executable, "-c", ROUND_TRIP.format(imports=imports, name=GRPC_EXPERIMENTS)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_importing_dsec_first_selects_iomgr_and_grpc_knows_the_names() -> None:
    seen, stderr = _run("import dsec\nimport grpc", None)
    assert seen == {"reply": "cba", "experiments": IOMGR_EXPERIMENTS}
    assert "Unknown experiment" not in stderr


def test_a_value_the_user_set_is_kept_even_empty() -> None:
    for value in ("", "-event_engine_client"):
        seen, _ = _run("import dsec\nimport grpc", value)
        assert seen == {"reply": "cba", "experiments": value}


def test_grpc_imported_before_dsec_is_left_alone() -> None:
    seen, _ = _run("import grpc\nimport dsec", None)
    assert seen == {"reply": "cba", "experiments": None}
