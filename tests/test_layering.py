"""The import graph of dsec/ and trainer/: no cycles, and no import from a lower layer into a higher one.

Why a test: cycles used to be dodged with function-level imports, and a module that reached up (the image
store into the substrates, the trajectory log into the SDK) tied layers together that should be usable alone.
Imports anywhere in a file count (function-level too); only `if TYPE_CHECKING:` blocks are left out, since a
type-only name is no runtime dependency. The one exception, `FUNCTION_LEVEL`, names each import that reaches up
only inside a function to keep a heavy optional part out of a process that does not use it, and holds only while
every such import of that pair stays inside a function. Reads the sources with `ast`; imports nothing it checks (the last test runs `import dsec` in a child process).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("dsec/v1/", "dsec/envd/")  # protobuf stubs written by dsec/codegen.py

# Layers, low to high. A module may import its own layer and the ones below it; same-layer imports are fine
# as long as they make no cycle. Modules not named here (the `dsec` package itself, `dsec.cli` and the other
# `*_cli` modules, `dsec.demo`, trainer/) are entry points or clients: they may import anything, and nothing in a
# layer may import them. A new module at the top of dsec/ that layers import belongs in layer 0 here.
LAYERS: dict[str, int] = {
    "dsec.models": 0, "dsec.errors": 0, "dsec.config": 0, "dsec.allowlist": 0, "dsec.loopdev": 0,
    "dsec.procwait": 0, "dsec.codegen": 0, "dsec.wire": 0, "dsec.v1": 0, "dsec.envd": 0, "dsec.step_export": 0,
    "dsec.pids": 0,
    "dsec.agent": 1, "dsec.images": 1, "dsec.trajectory": 1,
    "dsec.substrates": 2,
    "dsec.server": 3,
    "dsec.cluster": 4, "dsec.compat": 4, "dsec.sdk": 4,
}
# Command-line entry points inside a layer's folder: they assemble the node (a store plus the driver a RUN
# build step runs in) and sit above the server; nothing in a layer imports them.
ENTRY_POINTS = ("dsec.images.cli", "dsec.images.base_images", "dsec.images.local")
# The SDK is a client of the wire API: it may import only these (and itself); step_export is the JSONL/Parquet
# writers its trajectory export shares with the offline one.
SDK_MAY_IMPORT = ("dsec.sdk", "dsec.models", "dsec.errors", "dsec.wire", "dsec.v1", "dsec.codegen", "dsec.step_export")

# Upward imports allowed only function-level, each because the module it loads pulls in a heavy optional part.
# Tighten, never widen: an entry here that becomes a module-level import fails the test.
FUNCTION_LEVEL: dict[tuple[str, str], str] = {
    ("dsec.sdk.embedded", "dsec.server.launch"):
        "the SDK starts a local server only when given no address; the server needs the `server` extra",
    ("dsec.server.main", "dsec.compat.http_server"):
        "the HTTP front door (starlette, uvicorn, connectrpc) runs only with --http-listen",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in ("dsec", "trainer"):
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(GENERATED):
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _owner(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The project modules one import statement loads (`from pkg import mod` names the module, not the package)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            if MODULES[module].name != "__init__.py":
                parts = parts[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    owners = {_owner(name) for name in names}
    # a module's own package (and its parents) are imported before it anyway: no edge of its own
    return sorted(o for o in owners if o and o != module and not module.startswith(o + "."))


def _scan() -> tuple[dict[str, dict[str, int]], set[tuple[str, str]]]:
    """module -> {imported module: line}, and the (module, imported) pairs with an import outside any function."""
    graph: dict[str, dict[str, int]] = {}
    module_level: set[tuple[str, str]] = set()
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        type_only, in_function = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                type_only.update(id(n) for n in ast.walk(node))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                in_function.update(id(n) for n in ast.walk(node) if n is not node)
        edges: dict[str, int] = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in type_only:
                for target in _targets(module, node):
                    edges.setdefault(target, node.lineno)
                    if id(node) not in in_function:
                        module_level.add((module, target))
        graph[module] = edges
    return graph, module_level


def _imports() -> dict[str, dict[str, int]]:
    """module -> {imported module: line}."""
    return _scan()[0]


def _layer(module: str) -> int | None:
    if module in ENTRY_POINTS:
        return None
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def _violation(source: str, target: str, module_level: bool = True) -> str | None:
    """Why `source` may not import `target` (None: it may); `module_level`: some import of the pair is outside a
    function, which no FUNCTION_LEVEL entry allows."""
    if (source, target) in FUNCTION_LEVEL:
        return "allowed only inside a function (tests/test_layering.py FUNCTION_LEVEL)" if module_level else None
    if target.startswith(source + ".") or source.startswith(target + "."):
        return None  # a package and its own modules
    src, dst = _layer(source), _layer(target)
    if source.startswith("dsec.sdk.") or source == "dsec.sdk":
        if not any(target == p or target.startswith(p + ".") for p in SDK_MAY_IMPORT):
            return "the SDK imports only models, errors, wire and the generated stubs"
        return None
    if src is None:
        return None
    if dst is None:
        return "an entry point or client (top level, trainer/, an images CLI) imported from inside a layer"
    if dst > src:
        return f"layer {src} imports layer {dst}"
    return None


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, {}))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles() -> None:
    cycles = _cycles(_imports())
    assert not cycles, "import cycles (break them by moving the shared piece to the lower module): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_no_upward_imports() -> None:
    found = []
    graph, module_level = _scan()
    for source, edges in graph.items():
        for target, line in edges.items():
            why = _violation(source, target, (source, target) in module_level)
            if why:
                found.append(f"{MODULES[source].relative_to(ROOT)}:{line} imports {target} ({why})")
    assert not found, "imports against the layering (move the type to the layer that owns it):\n" + "\n".join(found)


def test_the_checker_sees_what_it_must() -> None:
    """The checks are only worth something if they see real edges: a known same-layer and downward import."""
    graph = _imports()
    assert "dsec.images.store" in graph["dsec.server.image_service"]
    assert "dsec.substrates.base" in graph["dsec.substrates.agent_sandbox"]
    assert _violation("dsec.images.store", "dsec.server.drivers")
    assert _violation("dsec.trajectory", "dsec.sdk.trajectory")
    assert _violation("dsec.agent.client", "dsec.substrates.base")
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def test_function_level_exceptions_are_real_and_function_level() -> None:
    """Each FUNCTION_LEVEL pair is an import that exists (a stale entry would hide a future one) and that the
    checker would refuse at module level."""
    graph, module_level = _scan()
    for source, target in FUNCTION_LEVEL:
        assert target in graph[source], f"{source} no longer imports {target}: drop its FUNCTION_LEVEL entry"
        assert (source, target) not in module_level
        assert _violation(source, target, module_level=True)
        assert _violation(source, target, module_level=False) is None


def test_the_sdk_runs_without_the_substrates_and_the_server() -> None:
    """What the layers are for: `import dsec` loads neither the substrates nor the server, and a spec names any
    substrate there (the server, which has the registry, answers an unknown one with the registered list)."""
    code = (
        "import sys, dsec\n"
        "from dsec.models import SandboxSpec\n"
        "assert SandboxSpec(substrate='plugged-in-on-the-server').substrate == 'plugged-in-on-the-server'\n"
        "try:\n"
        "    SandboxSpec(substrate='')\n"
        "except ValueError as exc:\n"
        "    assert 'substrate must be named' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('an empty substrate was accepted')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('dsec.substrates', 'dsec.server', 'dsec.trajectory.')))\n"
        "assert not loaded, loaded\n"
        "from dsec.substrates import registry\n"
        "try:\n"
        "    SandboxSpec(substrate='plugged-in-on-the-server')\n"
        "except ValueError as exc:\n"
        "    assert 'registered substrates: container' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('the registry did not install its check')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
