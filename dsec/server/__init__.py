"""The dsec gRPC server: sandbox lifecycle, exec/sessions/files, and the image and trajectory services.

`pip install dsec` is a client; the server's own dependencies come with the `server` extra. Checked here, on the
way into any server module (the SDK's embedded server included), so a client-only install fails at once with the
command that fixes it rather than with an ImportError from deep inside a driver.
"""

import importlib.util

_SERVER_MODULES = ("docker", "yaml", "prometheus_client", "starlette", "uvicorn", "python_multipart", "h11",
                   "websockets", "connectrpc")
_missing = [name for name in _SERVER_MODULES if importlib.util.find_spec(name) is None]
if _missing:
    raise ModuleNotFoundError(
        f"the dsec server needs the `server` extra (missing: {', '.join(_missing)}): pip install 'dsec[server]'",
        name=_missing[0],
    )
