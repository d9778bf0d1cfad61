"""The layers of docs/architecture.md hold: every import (module level or inside a function)
goes to the same package or to a layer below, there is no import cycle between modules, and
gRPC/protobuf and pyfuse3 stay in the modules whose job they are.

Read from the source with `ast`, so a lazy import inside a function counts like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: lowest first; a module may import its own package (the longest prefix it matches) and
#: anything of a lower layer, nothing above or beside
LAYERS: list[tuple[str, ...]] = [
    ("tvix_store.core",),
    ("tvix_store.util",),
    ("tvix_store.chunking",),
    ("tvix_store.protocol",),
    ("tvix_store.objects",),
    ("tvix_store.remote",),
    ("tvix_store.readahead",),
    ("tvix_store.blobservice",),
    ("tvix_store.directoryservice",),
    ("tvix_store.nar",),
    ("tvix_store.pathinfoservice",),
    ("tvix_store.store",),
    ("tvix_store.verify", "tvix_store.compose", "tvix_store.admission", "tvix_store.gc"),
    ("tvix_store.importer", "tvix_store.serve", "tvix_store.copy"),
    ("tvix_store.narbridge",),
    ("tvix_fuse",),
    ("tvix_store.cli",),
]

#: third-party packages confined to the modules whose job they are (prefix → allowed importers)
CONFINED = {
    "pyfuse3": ("tvix_fuse.ops", "tvix_fuse.mount"),
    "grpc": (
        "tvix_store.protocol",
        "tvix_store.remote",
        "tvix_store.serve",
        "tvix_store.blobservice.grpc",
        "tvix_store.directoryservice.grpc",
        "tvix_store.pathinfoservice.grpc",
    ),
    "grpc_health": ("tvix_store.remote", "tvix_store.serve"),
    "grpc_reflection": ("tvix_store.serve",),
    "google.protobuf": ("tvix_store.protocol",),
    "aiohttp": ("tvix_store.narbridge.app", "tvix_store.narbridge.server"),
    "cryptography": ("tvix_store.narbridge.signing",),
    "prometheus_client": ("tvix_store.serve.metrics",),
    "obstore": ("tvix_store.objects.buckets",),
    "psycopg": ("tvix_store.remote.postgres",),
    "psycopg_pool": ("tvix_store.remote.postgres",),
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in ("tvix_store", "tvix_fuse"):
        for p in (REPO / pkg).rglob("*.py"):
            rel = p.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            if name.startswith(("tvix_store.protocol.g1", "tvix_store.protocol.g2", "tvix_store.protocol.g3")):
                continue  # generated
            out[name] = p
    return out


def imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return out


def layer_of(mod: str) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    return best


def project_module(mod: str, known: dict[str, Path]) -> str | None:
    """The project module an imported name refers to (the longest known prefix), or None."""
    parts = mod.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in known:
            return cand
    return None


def graph() -> dict[str, set[str]]:
    known = modules()
    g: dict[str, set[str]] = {}
    for name, path in known.items():
        deps = {project_module(m, known) for m in imports(name, path)}
        g[name] = {d for d in deps if d is not None and d != name}
    return g


def test_every_module_is_in_a_layer() -> None:
    missing = [m for m in modules() if m not in ("tvix_store", "tvix_fuse") and layer_of(m) is None]
    assert not missing, f"modules in no layer (add them to LAYERS and docs/architecture.md): {missing}"


def test_imports_go_down_only() -> None:
    bad = []
    for mod, deps in graph().items():
        mine = layer_of(mod)
        if mine is None:
            continue
        for d in deps:
            theirs = layer_of(d)
            if theirs is None:
                continue  # the package roots (version, docstrings)
            same_package = theirs[1] == mine[1]
            if not same_package and theirs[0] >= mine[0]:
                bad.append(f"{mod} (layer {mine[0]}) imports {d} (layer {theirs[0]})")
    assert not bad, "imports that go up or sideways:\n" + "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


def test_third_party_packages_stay_where_they_belong() -> None:
    known = modules()
    bad = []
    for name, path in known.items():
        for m in imports(name, path):
            for pkg, allowed in CONFINED.items():
                if (m == pkg or m.startswith(pkg + ".")) and not any(
                    name == a or name.startswith(a + ".") for a in allowed
                ):
                    bad.append(f"{name} imports {m}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_checker_sees_a_violation() -> None:
    """The analysis itself: a synthetic upward import, a cycle and a lazy import are found."""
    fake = {"tvix_store.core.x": "def f():\n    from tvix_store.compose import open_store\n"}
    ((name, src),) = fake.items()
    path = REPO / "tests" / "__layers_probe__.py"
    try:
        path.write_text(src)
        found = imports(name, path)
    finally:
        path.unlink()
    assert "tvix_store.compose" in found
    assert layer_of("tvix_store.compose")[0] > layer_of("tvix_store.core.x")[0]  # type: ignore[index]
