"""Any merged checkpoint: an image encoder merged elsewhere, read from a file.

    merge:
      mine: {method: checkpoint, path: /path/to/merged.safetensors}

`path` (required; relative paths are from the project root) is anything `repsurgery convert`
reads (`pipeline/models/convert.py`): open_clip state dicts (.safetensors, .pt/.bin, whole
CLIP or visual-only keys), Hugging Face CLIPVisionModel folders (a folder without
`visual_projection` takes the pretrained projection), the Task Arithmetic release's pickled
ImageEncoders. It is converted to the pretrained encoder's tensor names, shapes and dtypes;
a missing file or one made for another architecture is one PipelineError line naming the
path. The entry then gets extraction, surgery, evaluation and the analyses like any method.

DVC sees only the params entry, not the file: replacing the file under the same path does not
rerun the entry's stage by itself (run `dvc repro -f merge@<key>`, or give the new file a new
name). The file's sha256 (for a folder, of its files' names and bytes) is recorded in the
entry's JSON beside the checkpoint, so which file was used can always be checked.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated

from pydantic import Field

from cache.files import sha256_file
from pipeline.errors import PipelineError
from pipeline.merging.inputs import MergeInputs
from pipeline.merging.registry import Merged, merge_method


def content_sha256(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted)."""
    if path.is_file():
        return sha256_file(path).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        sha256_file(file, digest)
    return digest.hexdigest()


@merge_method("checkpoint", label=lambda p: f"Checkpoint {Path(p.path).name}")
def checkpoint(inputs: MergeInputs, *, path: Annotated[str, Field(min_length=1)]) -> Merged:
    from pipeline.models.convert import to_canonical

    source = Path(path).expanduser()
    if not source.exists():
        raise PipelineError(f"merge method 'checkpoint': {source} does not exist (resolved from the project root: "
                            f"{source.resolve()}); set the entry's `path` to a merged image encoder file or Hugging "
                            "Face model folder")
    try:
        state, kind = to_canonical(source, inputs.pretrained)
    except PipelineError as exc:
        message = " ".join(str(exc).split())
        raise PipelineError(f"merge method 'checkpoint', path {source}: {message}") from None
    return Merged(state, {"path": str(path), "format": kind, "sha256": content_sha256(source)})
