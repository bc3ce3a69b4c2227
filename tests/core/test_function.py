"""The function substrate: callables pickled by value, results and exceptions, limits, isolation."""

from __future__ import annotations

import math

import pytest

import dsec

COUNTER = {"calls": 0}


def bump_global_counter() -> int:
    COUNTER["calls"] += 1
    return COUNTER["calls"]


def fails_deep() -> None:
    def inner() -> None:
        raise KeyError("missing-key")

    inner()


@pytest.fixture(scope="module")
def fn_sandbox(client):
    with client.create("python", "function", memory_mb=512, timeout_s=600) as sb:
        yield sb


def test_call_returns_value_computed_in_sandbox(fn_sandbox):
    assert fn_sandbox.call(math.factorial, 30) == math.factorial(30)
    scale = 3
    assert fn_sandbox.call(lambda xs: [scale * x for x in xs], [1, 2, 3]) == [3, 6, 9]
    hostname = fn_sandbox.call(lambda: __import__("socket").gethostname())
    assert hostname == fn_sandbox.id, "the callable runs inside the sandbox, not on the host"


def test_exception_is_reraised_with_remote_traceback(fn_sandbox):
    with pytest.raises(KeyError) as info:
        fn_sandbox.call(fails_deep)
    assert "missing-key" in str(info.value)
    assert "inner" in info.value.remote_traceback


def test_calls_are_isolated_from_each_other(fn_sandbox):
    assert fn_sandbox.call(bump_global_counter) == 1
    assert fn_sandbox.call(bump_global_counter) == 1, "module state of one call must not leak into the next"


def test_call_timeout(fn_sandbox):
    import time

    with pytest.raises(dsec.CallTimeout):
        fn_sandbox.call_with_options(time.sleep, (30,), timeout=1.0)
    assert fn_sandbox.call(sum, [1, 2]) == 3, "the worker recovers after a timed-out call"


def test_call_memory_limit(fn_sandbox):
    with pytest.raises(dsec.OutOfMemory):
        fn_sandbox.call_with_options(lambda: bytearray(300 * 1024 * 1024), timeout=30, memory_mb=64)
    assert fn_sandbox.call(len, "ok") == 2


def test_stdout_of_the_call_is_captured_not_mixed_into_the_protocol(fn_sandbox):
    def noisy() -> str:
        print("printed inside")
        return "value"

    assert fn_sandbox.call(noisy) == "value"
    assert fn_sandbox.last_call_output[0] == b"printed inside\n"


def test_untrusted_results_are_not_unpickled_by_default(client, fn_sandbox):
    class Custom:
        pass

    with pytest.raises(Exception, match="trust_results"):
        fn_sandbox.call(Custom)
    trusted = client.connect(fn_sandbox.id, trust_results=True)
    assert type(trusted.call(Custom)).__name__ == "Custom"


def test_call_on_a_container_sandbox_is_a_typed_error(client):
    with client.create("busybox", "container") as sb:
        with pytest.raises(dsec.InvalidSpec, match="function"):
            sb.call(len, "x")


def test_function_substrate_needs_python_in_the_image(client):
    with pytest.raises(dsec.InvalidSpec, match="python3"):
        client.create("busybox", "function")
