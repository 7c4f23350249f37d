"""The house rules of ``titok_jax/`` (docs/layout.md), read from every module's imports with ast:
layers import only layers below them, no import circle between files, no ``_private`` name taken
from another file, the command line imported by nothing, and neither the benchmarks nor torch
imported when the package is. Each failure names the file and line."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "titok_jax")

# Bottom to top: a module may import its own layer and the layers before it, never one after it.
LAYERS = (
    "infra",      # ground: paths, atomic writes, barriers, sharding, Orbax, cache, config parsing
    "models",     # Flax modules, the variant table, the LPIPS network
    "convert",    # official <-> Flax name maps and layouts
    "data",       # TFDS/Grain input, image folders, embedded photos, token datasets (reader)
    "inference",  # a model bound to its weights: the one loader, public APIs, predictor, sampler
    "gan",        # networks and losses of the GAN phase
    "evals",      # evaluators fed prediction functions
    "train",      # the loop, tasks, train state, losses, run defaults
    "jobs",       # resumable batch work without argparse: pretokenize, generate, serving export
    "cli",        # argparse and console output; nothing imports it
)
FACE = "titok_jax"  # titok_jax/__init__.py: the public names, imported by users only
# Modules that may import the package face: none inside the package (they import the module
# that defines a name), so the face can import any layer without a circle.
FACE_IMPORTERS: tuple[str, ...] = ()
# Modules whose module-level imports may not include these (import time stays light and free of
# PyTorch, which only weight conversion and parity checks need).
HEAVY_AT_IMPORT = ("torch", "benchmarks")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                out[_module_name(path)] = path
    return out


MODULES = _modules()


class Import:
    def __init__(self, source: str, line: int, target: str, names: tuple[str, ...],
                 top_level: bool):
        self.source, self.line, self.target = source, line, target
        self.names, self.top_level = names, top_level

    def where(self) -> str:
        return f"{os.path.relpath(MODULES[self.source], ROOT)}:{self.line}"


def _resolve(source: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[source].endswith("__init__.py")
    parts = source.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(source: str) -> list[Import]:
    tree = ast.parse(open(MODULES[source]).read(), MODULES[source])
    top = {id(n) for n in tree.body}
    # Imports inside `if TYPE_CHECKING:` or try blocks at module level count as top level too.
    for n in tree.body:
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(c) for c in ast.walk(n)}
    return [imp for node in ast.walk(tree) for imp in _edges(source, node, id(node) in top)]


def _edges(source: str, node: ast.AST, top_level: bool) -> list[Import]:
    """The imports one statement makes ("from pkg import module" is an edge to the module)."""
    if isinstance(node, ast.Import):
        return [Import(source, node.lineno, a.name, (), top_level) for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    target = _resolve(source, node)
    names = tuple(a.name for a in node.names)
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    if subs and len(subs) == len(names):
        return [Import(source, node.lineno, sub, (), top_level) for sub in subs]
    return [Import(source, node.lineno, target, names, top_level)]


IMPORTS = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> str | None:
    """The layer folder of a package module (None for the face ``titok_jax``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _internal(target: str) -> bool:
    return target == FACE or target.startswith(FACE + ".")


def test_every_module_lives_in_a_layer_folder():
    loose = [os.path.relpath(p, ROOT) for m, p in MODULES.items()
             if m != FACE and _layer(m) not in LAYERS]
    assert not loose, ("modules outside the layer folders (see LAYERS in this file and "
                       f"docs/layout.md): {loose}")


def layer_violations(imports: dict[str, list[Import]]) -> list[str]:
    problems = []
    for source, items in imports.items():
        for imp in items:
            if not _internal(imp.target):
                continue
            if imp.target == FACE:
                if source != FACE and source not in FACE_IMPORTERS:
                    problems.append(f"{imp.where()}: imports the package face `titok_jax`; "
                                    f"import the module that defines {imp.names or 'it'}")
                continue
            if source == FACE:
                continue
            src, dst = _layer(source), _layer(imp.target)
            if dst == "cli" and src != "cli":
                problems.append(f"{imp.where()}: imports {imp.target}: nothing outside cli/ "
                                f"imports the command line")
            elif LAYERS.index(dst) > LAYERS.index(src):
                problems.append(f"{imp.where()}: {src}/ imports {imp.target}, a higher layer "
                                f"({dst}/); layers go {' < '.join(LAYERS)}")
    return problems


def test_layers_import_only_layers_below():
    problems = layer_violations(IMPORTS)
    assert not problems, "\n".join(problems)


def private_imports(imports: dict[str, list[Import]]) -> list[str]:
    problems = []
    for items in imports.values():
        for imp in items:
            if _internal(imp.target):
                names = (*imp.names, imp.target.rsplit(".", 1)[-1])  # names, or the module
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private:
                    problems.append(f"{imp.where()}: takes private {private} from "
                                    f"{imp.target}; make it public or move it")
    return problems


def test_no_private_name_crosses_files():
    problems = private_imports(IMPORTS)
    assert not problems, "\n".join(problems)


def import_circles(imports: dict[str, list[Import]]) -> list[list[str]]:
    """Strongly connected components (more than one file) of the file import graph, deferred
    (function-level) imports included: a circle is a circle whenever it is closed."""
    graph = {m: sorted({i.target for i in items if i.target in imports and i.target != m})
             for m, items in imports.items()}
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_between_files():
    circles = import_circles(IMPORTS)
    lines = []
    for comp in circles:
        ties = [f"  {i.where()} -> {i.target}" for m in comp for i in IMPORTS[m]
                if i.target in comp]
        lines.append("circle: " + " <-> ".join(comp) + "\n" + "\n".join(ties))
    assert not circles, "\n".join(lines)


def heavy_imports(imports: dict[str, list[Import]]) -> list[str]:
    problems = []
    for items in imports.values():
        for imp in items:
            root = imp.target.split(".")[0]
            if root == "benchmarks":
                problems.append(f"{imp.where()}: imports {imp.target}: the package never "
                                f"imports the benchmarks")
            elif root in HEAVY_AT_IMPORT and imp.top_level:
                problems.append(f"{imp.where()}: imports {imp.target} at module level; import "
                                f"it inside the function that converts weights")
    return problems


def test_package_imports_neither_benchmarks_nor_torch_at_import_time():
    problems = heavy_imports(IMPORTS)
    assert not problems, "\n".join(problems)


def test_importing_the_package_and_its_cli_loads_no_torch():
    code = ("import sys, titok_jax, titok_jax.cli.main as m; m.build_parser(); "
            "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'benchmarks')); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the rules themselves can fail ---------------------------------------------------------------

def _planted(source: str, code: str) -> dict[str, list[Import]]:
    """IMPORTS with ``code`` added to ``source`` (parsed as if it stood at its end)."""
    extra = [imp for node in ast.parse(code).body for imp in _edges(source, node, True)]
    for imp in extra:
        imp.line = 9999
    return {**IMPORTS, source: IMPORTS[source] + extra}


@pytest.mark.parametrize("source,code,check", [
    ("titok_jax.models.titok", "from titok_jax.train import loop", layer_violations),
    ("titok_jax.inference.tokenizer", "from titok_jax.cli import args", layer_violations),
    ("titok_jax.evals.fid", "import titok_jax", layer_violations),
    ("titok_jax.inference.alit", "from titok_jax.inference.tokenizer import _IMAGE_HINT",
     private_imports),
    ("titok_jax.infra.paths", "from titok_jax.infra import checkpointing", import_circles),
    ("titok_jax.data.images", "import torch", heavy_imports),
    ("titok_jax.evals.fid", "from benchmarks import common", heavy_imports),
])
def test_a_planted_bad_import_is_caught(source, code, check):
    assert not check(IMPORTS), "the house breaks the rule already"
    found = check(_planted(source, code))
    assert found, f"{code!r} in {source} went unnoticed"
    if check is not import_circles:
        assert any(":9999" in p for p in found), found
