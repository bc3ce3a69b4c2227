"""One embedded dsec server for the core tests, and the substrate/driver matrix of the conformance suite."""

from __future__ import annotations

import os

import pytest

import dsec

# (substrate, driver, image): every case runs the same conformance tests.
CONTAINER_CASES = [
    pytest.param(("container", "crun", "busybox"), id="container-crun"),
    pytest.param(("container", "runc", "busybox"), id="container-runc"),
    pytest.param(("container", "docker", "busybox"), id="container-docker"),
    pytest.param(("function", "", "python"), id="function"),
]
VM_CASES = [
    pytest.param(("microvm", "", "busybox"), id="microvm"),
    pytest.param(("vm", "", "busybox"), id="vm"),
]


@pytest.fixture(scope="session")
def client():
    c = dsec.Client(os.environ.get("DSEC_TEST_ADDRESS"))
    yield c
    c.close()


@pytest.fixture(params=CONTAINER_CASES + VM_CASES)
def case(request):
    return request.param


@pytest.fixture
def sandbox(client, case):
    substrate, driver, image = case
    sb = client.create(image, substrate, driver=driver, memory_mb=256, timeout_s=600)
    yield sb
    try:
        sb.destroy()
    except dsec.DsecError:
        pass
