"""Which code a result comes from: the import closure of the modules that compute it, read from
their source, and a digest of those files.

A result that records the digest of its own closure is recomputed when that code changes and
only then: editing one merge method re-runs that method's entries, editing shared code
re-runs everything that imports it, and a plugin's module counts like a built-in one. The
closure is static (imports inside functions count, so it may over-approximate); the merge
registry's dynamic import of every method module is not an edge, so one method's closure holds
no other method. A package that imports every module of its own (`pkgutil.iter_modules(__path__)`:
the adapter registry) has them all in its closure: a stage that picks one by name at run time
runs any of them. No torch here: the first pipeline stage computes digests before anything is
loaded.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import cache
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("pipeline", "stages", "cache")
# Modules whose changes cannot change a result: the command dispatcher, progress bars, params
# validation (the values it checks are DVC params, recorded apart) and the error type.
NOT_RESULTS = frozenset({"stages.cli", "stages.common", "pipeline.config", "pipeline.errors"})


@cache
def module_file(name: str) -> Path | None:
    """The source file of module `name` (a package's __init__.py), None where there is none."""
    if name.split(".")[0] in PROJECT:  # without importing anything: the project's own layout
        base = ROOT.joinpath(*name.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.exists():
                return candidate
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    return Path(origin) if origin and origin.endswith(".py") else None


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module name of a (possibly relative) `from ... import`."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported(name: str, roots: tuple[str, ...]) -> set[str]:
    """The modules under `roots` (top-level package names) that module `name` imports, at module
    level or inside functions (a package's own __init__ counts where it is imported by name)."""
    path = module_file(name)
    return set(_imported(name, path.read_text(), path.name == "__init__.py", roots))


@cache  # by source text: an edited module is parsed again, an unchanged one once per process
def _imported(name: str, source: str, is_package: bool, roots: tuple[str, ...]) -> frozenset[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=str(module_file(name)))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, name, is_package)
            if base.split(".")[0] in roots:  # never look another package up: that would import it
                names = [n if module_file(n) else base for n in (f"{base}.{a.name}" for a in node.names)]
        out |= {full for full in names if full.split(".")[0] in roots and module_file(full)}
    if is_package and "iter_modules(__path__)" in source:  # a registry package: every module of its own
        folder = module_file(name).parent
        out |= {f"{name}.{path.stem}" for path in folder.glob("*.py") if path.stem != "__init__"}
    return frozenset(out)


def closure(modules: Iterable[str]) -> dict[str, Path]:
    """Every module the given ones run (themselves included, NOT_RESULTS left out), by name ->
    file: project modules, and a plugin's modules within its own top-level package."""
    modules = list(modules)
    roots = tuple(sorted({*PROJECT, *(m.split(".")[0] for m in modules)}))
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_RESULTS or module_file(name) is None:
            continue
        seen[name] = module_file(name)
        todo += imported(name, roots)
    return dict(sorted(seen.items()))


def digest(modules: Iterable[str]) -> str:
    """A short hash of the source of every module in the closure of `modules`."""
    return describe(modules)["digest"]


def describe(modules: Iterable[str]) -> dict:
    """What a fingerprint file records: the digest and each file of the closure with its hash."""
    h, files = hashlib.sha256(), {}
    for name, path in closure(modules).items():
        file_hash = hashlib.sha256(path.read_bytes())
        h.update(name.encode() + b"\0" + file_hash.digest())
        files[_shown(path)] = file_hash.hexdigest()[:16]
    return {"digest": h.hexdigest()[:16], "files": files}


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:  # a plugin outside the project
        return str(path)
