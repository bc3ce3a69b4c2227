"""Build: Dockerfile subset and Python API, RUN in a real crun sandbox, one cached layer per step."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from dsec.errors import InvalidSpec
from dsec.images.base_images import build_busybox
from dsec.images.build import BuildSpec, build, parse_dockerfile
from dsec.images.local import run_driver
from dsec.images.store import LayerStore

DOCKERFILE = """
# a comment
FROM busybox
RUN echo built > /hello && \\
    rm /etc/group && mkdir -p /opt/app
ENV GREETING=hi MODE=test
COPY app/ /opt/app/
WORKDIR /opt/app
USER nobody
"""


@pytest.fixture
def context(tmp_path: Path) -> Path:
    app = tmp_path / "ctx" / "app"
    app.mkdir(parents=True)
    (app / "main.sh").write_text("echo main\n")
    (app / "main.sh").chmod(0o755)
    return tmp_path / "ctx"


@pytest.mark.timeout(240)
def test_dockerfile_build_then_cached_rebuild(store: LayerStore, context: Path) -> None:
    build_busybox(store)
    spec = parse_dockerfile(DOCKERFILE)
    first = build(store, spec, tag="app:1", context=context, run_driver=run_driver)
    assert (first.steps_run, first.steps_cached) == (6, 0)
    record = first.record
    assert len(record.layers) == 3  # busybox + RUN + COPY; ENV/WORKDIR/USER change only the config
    assert "GREETING=hi" in record.config.env and record.config.workdir == "/opt/app" and record.config.user == "nobody"
    lower = store.resolve("app:1").lower_dirs
    run_layer, copy_layer = lower[1], lower[0]
    assert (run_layer / "hello").read_text() == "built\n"
    wh = os.lstat(run_layer / "etc" / "group")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0  # the deletion is a whiteout
    assert not (run_layer / ".dsec").exists()
    assert (copy_layer / "opt/app/main.sh").read_text() == "echo main\n"
    assert os.stat(copy_layer / "opt/app/main.sh").st_mode & 0o777 == 0o755

    started = time.perf_counter()
    again = build(store, parse_dockerfile(DOCKERFILE), tag="app:1", context=context, run_driver=run_driver)
    elapsed = time.perf_counter() - started
    assert (again.steps_run, again.steps_cached) == (0, 6) and again.record.digest == record.digest
    assert elapsed < 0.5, f"cached rebuild took {elapsed:.3f}s"

    (context / "app" / "main.sh").write_text("echo changed\n")  # COPY input changed: from that step on
    changed = build(store, parse_dockerfile(DOCKERFILE), tag="app:2", context=context, run_driver=run_driver)
    assert (changed.steps_run, changed.steps_cached) == (3, 3)
    assert changed.record.layers[:2] == record.layers[:2]


@pytest.mark.timeout(120)
def test_python_api_and_failing_run(store: LayerStore) -> None:
    build_busybox(store)
    result = build(store, BuildSpec("busybox").env(X="1").run(["sh", "-c", "echo $X > /x"]), tag="api", run_driver=run_driver)
    assert (store.resolve("api").lower_dirs[0] / "x").read_text() == "1\n"
    with pytest.raises(InvalidSpec, match="exit code 3.*boom"):
        build(store, BuildSpec("busybox").run("echo boom; exit 3"), run_driver=run_driver)
    assert result.steps_run == 2


@pytest.mark.parametrize(("text", "match"), [
    ("RUN true", "before FROM"),
    ("FROM busybox\nADD x /", "not supported"),
    ("FROM a\nFROM b", "multi-stage"),
    ("FROM busybox\nRUN [not json", "JSON"),
    ("", "no FROM"),
])
def test_dockerfile_errors(text: str, match: str) -> None:
    with pytest.raises(InvalidSpec, match=match):
        parse_dockerfile(text)


def test_copy_outside_context_rejected(store: LayerStore, context: Path) -> None:
    build_busybox(store)
    with pytest.raises(InvalidSpec, match="outside the build context"):
        build(store, BuildSpec("busybox").copy("../../etc/passwd", "/x"), context=context, run_driver=run_driver)
