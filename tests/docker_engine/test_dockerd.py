"""Finding or starting the Docker Engine: reuse a live one, never hang on a dead address."""

from __future__ import annotations

import time

import pytest

from dsec.substrates.container.dockerd import DSEC_DOCKER_SOCKET, ensure_engine, ping


@pytest.mark.timeout(60)
def test_ensure_engine_is_idempotent_and_reuses_the_running_engine(engine_url):
    started = time.monotonic()
    assert ensure_engine(use_docker_host=False) == f"unix://{DSEC_DOCKER_SOCKET}"
    assert ensure_engine(use_docker_host=False) == f"unix://{DSEC_DOCKER_SOCKET}"
    assert time.monotonic() - started < 5, "a running engine must be reused, not restarted"
    assert ping(engine_url)


@pytest.mark.timeout(30)
def test_ping_of_dead_or_bogus_addresses_is_false_quickly(tmp_path):
    started = time.monotonic()
    assert not ping(f"unix://{tmp_path}/no-such.sock")
    assert not ping("tcp://127.0.0.1:1")
    assert not ping("ssh://somewhere")
    assert time.monotonic() - started < 10


@pytest.mark.timeout(60)
def test_docker_host_is_used_when_it_answers_and_ignored_when_dead(monkeypatch, engine_url):
    monkeypatch.setenv("DOCKER_HOST", engine_url)
    assert ensure_engine() == engine_url
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    assert ensure_engine() == f"unix://{DSEC_DOCKER_SOCKET}"
