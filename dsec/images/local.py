"""The driver a RUN build step runs in, for this node's command-line entry points (`dsec images build`, the
setup-time base images).

Why a module of its own: `images.build` sits below the substrates and the server, so it takes the driver from its
caller; the server's ImageService passes one, and this is where the entry points in images/ get theirs. It and
its importers are entry points (tests/test_layering.py): nothing below the server imports them.
"""

from __future__ import annotations

from dsec.config import ServerConfig
from dsec.images.build import RUN_DRIVER, RunDriver


def run_driver() -> RunDriver:
    """The `RUN_DRIVER` driver, built for this node's configuration."""
    # imported here: the server's drivers (and the runtimes behind them) load only when a RUN step is built, so
    # `dsec images ls|import|pull|...` work without the server's extras
    from dsec.server.drivers import DriverRegistry

    return DriverRegistry(ServerConfig()).get(RUN_DRIVER)
