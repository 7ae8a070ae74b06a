"""The layering rules: the core runs without pyfuse3, and --help loads none of the network stack."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import vapifs

FUSE = {"fs", "mount"}  # the only modules that may import pyfuse3

BLOCK_PYFUSE3 = """
import sys
from pathlib import Path
class NoPyfuse3:
    def find_spec(self, name, path=None, target=None):
        if name == "pyfuse3" or name.startswith("pyfuse3."):
            raise ImportError("pyfuse3 is not installed here")
        return None
sys.meta_path.insert(0, NoPyfuse3())
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_the_core_imports_without_pyfuse3() -> None:
    # Every module but the FUSE adapter and the mount's main loop, present and future.
    core = sorted(m.name for m in pkgutil.iter_modules(vapifs.__path__) if m.name not in FUSE)
    assert {"api", "blocks", "core", "fetch", "reader", "resolver", "tree"} <= set(core)
    code = BLOCK_PYFUSE3 + "".join(f"import vapifs.{name}\n" for name in core)
    code += "assert 'pyfuse3' not in sys.modules\nprint('ok')\n"
    result = run(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    # The check itself works: the adapter does need pyfuse3.
    assert "pyfuse3 is not installed here" in run(BLOCK_PYFUSE3 + "import vapifs.fs\n").stderr


def test_help_loads_neither_fuse_nor_the_network_stack() -> None:
    code = (
        "import sys\n"
        "from vapifs.cli import build_parser\n"
        "build_parser().format_help()\n"
        "heavy = {'pyfuse3', 'trio', 'httpx', 'httpcore', 'cryptography'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# The flow, top to bottom: a module may import only modules of its own rank or below, and
# the graph has no cycle. A new module takes its place here (the README's module table).
RANKS = {
    "cli": 0,
    "mount": 1,
    "prefetch": 1,
    "cachecmd": 2,
    "fs": 2,
    "jobs": 2,
    "stats": 3,
    "statscmd": 2,
    "core": 3,
    "tree": 4,
    # The rooms of the tree, each with one job; none imports the tree.
    "ahead": 5,
    "tables": 5,
    "callfiles": 6,
    "lifecycle": 7,
    "window": 8,
    "views": 9,
    "entries": 10,
    "nodes": 11,
    "gzview": 12,
    "reader": 12,
    "walk": 12,
    # The rooms of the reader, each with one job; none imports the reader.
    "readahead": 13,
    "versions": 13,
    "ends": 14,
    "loads": 14,
    "memory": 15,
    "writers": 15,
    "diskreads": 15,
    "inflight": 16,
    "blocks": 17,
    "meta": 17,
    # The rooms of the block store, below its face; the file format is a leaf.
    "blockdrop": 18,
    "blockread": 18,
    "blockwrite": 18,
    "blockindex": 19,
    "blockscan": 19,
    "openfiles": 20,
    "blockfile": 21,
    "fetch": 18,
    "resolver": 19,
    "api": 20,
    # Leaves: no state of the flow, imported from anywhere.
    **dict.fromkeys(
        [
            "atrest",
            "cachefiles",
            "cachekey",
            "cachelock",
            "calls",
            "changes",
            "config",
            "crypto",
            "defaults",
            "errors",
            "h11buffer",
            "heap",
            "redact",
            "rate",
            "readstats",
            "retry",
            "sdnotify",
            "table",
            "tls",
            "tlsstream",
            "units",
            "urlbook",
            "version",
        ],
        21,
    ),
}


def imports_of(path: Path, package: str) -> set[str]:
    """The vapifs modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            module = ".".join([*base, node.module] if node.module else base)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vapifs"):
            found.add(str(node.module))
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vapifs"))
    return found


def import_graph() -> dict[str, set[str]]:
    root = Path(vapifs.__file__).parent
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        package = "vapifs." + name if path.name == "__init__.py" else f"vapifs.{name}"
        package = package if path.name == "__init__.py" else package.rsplit(".", 1)[0]
        found = {m.removeprefix("vapifs.") for m in imports_of(path, package)}
        graph[name] = {m for m in found if m in modules and m not in (name, "")}
    return graph


def test_imports_run_down_the_flow_without_cycles() -> None:
    graph = import_graph()
    flow = {name: deps for name, deps in graph.items() if not name.startswith("demo")}
    unplaced = sorted(set(flow) - set(RANKS) - {""})
    assert not unplaced, f"give these modules a rank in RANKS: {unplaced}"
    upward = [
        f"{name} -> {dep}"
        for name, deps in flow.items()
        for dep in deps
        if name in RANKS and dep in RANKS and RANKS[dep] < RANKS[name]
    ]
    assert not upward, upward
    # No cycle: repeatedly remove modules that import nothing left.
    left = {name: set(deps) for name, deps in graph.items()}
    while left:
        free = [name for name, deps in left.items() if not deps & set(left)]
        assert free, f"an import cycle among {sorted(left)}"
        for name in free:
            del left[name]


def test_the_fake_stands_apart_from_the_code_it_fakes() -> None:
    # The fake Vapi must not borrow the production tables: a shared mistake would pass.
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("demo") and name != "demo.tour":
            assert all(dep.startswith("demo") for dep in deps), (name, deps)


def test_the_mount_and_prefetch_open_the_core_one_way() -> None:
    # Both commands open it through core.opened_core: neither builds a client or a cache
    # itself, so that what one opens differently the other cannot miss.
    root = Path(vapifs.__file__).parent
    builders = {"http_client", "api_client", "open_core", "VapiClient", "Resolver", "Fetcher"}
    builders |= {"BlockCache", "MetaStore", "ArtifactStore"}
    for name in ("mount", "prefetch"):
        tree = ast.parse((root / f"{name}.py").read_text())
        from_core = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "core"
            for alias in node.names
        }
        assert "opened_core" in from_core, name
        called = {
            node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
        }
        assert not (from_core | called) & builders, (name, (from_core | called) & builders)


def test_the_bench_modules_import_one_another_without_cycles() -> None:
    bench = Path(__file__).resolve().parent.parent / "bench"
    names = {path.stem for path in bench.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name in names:
        found: set[str] = set()
        for node in ast.walk(ast.parse((bench / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
        graph[name] = found & names - {name}
    assert {"run", "many", "harness"} <= set(graph)
    left = graph
    while left:
        free = [name for name, deps in left.items() if not deps & set(left)]
        assert free, f"an import cycle among {sorted(left)}"
        left = {name: deps for name, deps in left.items() if name not in free}
