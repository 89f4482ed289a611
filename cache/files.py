"""Writing files so that a crash, a full disk or a second writer never leaves a half-written
output under the final name, and hashing files without reading them whole."""
from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temporary_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A name beside `path` that is unique to this process, so two writers never collide."""
    return path.with_name(f".{path.name}.{os.getpid()}{suffix}")


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary name to write to; it replaces `path` only if the block completes.

    On any error (including a full disk) the temporary file is removed and `path` keeps its
    previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def sha256_file(path, digest=None) -> "hashlib._Hash":
    """Feed a file's bytes, in blocks, into `digest` (a new sha256 by default) and return it."""
    digest = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest


def tree_digest(*roots: Path, pattern: str = "*.py") -> str:
    """One hash of every matching file's path and bytes under the roots (e.g. a package's code)."""
    digest = hashlib.sha256()
    for root in map(Path, roots):
        for path in sorted(root.rglob(pattern)):
            digest.update(str(path.relative_to(root.parent)).encode())
            sha256_file(path, digest)
    return digest.hexdigest()
