"""Writing files so that a crash, a full disk or a second writer never leaves a half-written
output under the final name, and hashing files without reading them whole."""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temporary_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A name beside `path` that is unique to this process, so two writers never collide."""
    return path.with_name(f".{path.name}.{os.getpid()}{suffix}")


# Errors of the storage itself (not of the data being written): reported as a WriteError.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO}


class WriteError(Exception):
    """An output could not be written (full disk, quota, permissions): the message names the
    file and the fix; the file's previous content is intact."""


def storage_errno(exc: BaseException) -> int | None:
    """The storage errno behind `exc`: an OSError's, or the "(os error N)" that Rust libraries
    (safetensors) put in their own exception's message."""
    code = getattr(exc, "errno", None)
    if code is None:
        found = re.search(r"\(os error (\d+)\)", str(exc))
        code = int(found.group(1)) if found else None
    return code if code in STORAGE_ERRNOS else None


@contextmanager
def storage_errors(error: type[Exception], message: str) -> Iterator[None]:
    """A full disk or another storage error in the block becomes `error(message)`, with
    `{reason}` in the message replaced by the system's words for it; anything else passes."""
    try:
        yield
    except Exception as exc:
        code = storage_errno(exc)
        if code is None:
            raise
        raise error(message.format(reason=os.strerror(code))) from exc


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary name to write to; it replaces `path` only if the block completes.

    On any error the temporary file is removed and `path` keeps its previous content; a full
    disk or another storage error becomes a WriteError naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with storage_errors(WriteError, f"could not write {path}: {{reason}}; its previous content is unchanged. "
                                        "Free disk space (or fix the permissions), then run the command again"):
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
