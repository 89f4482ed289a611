"""Downloading the real models and test splits from the Hugging Face Hub, resumably, into one
documented cache folder, and finding them there later without touching the network.

References look like `hf://owner/name[/subfolder]`. A model lands in
`<cache>/models/owner/name/`, a dataset in `<cache>/datasets/owner/name/`; what was fetched
(files, sizes, sha256) is recorded in `<cache>/manifest.json`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cache.files import sha256_file, write_text
from pipeline.errors import PipelineError

PREFIX = "hf://"
ETAG_TIMEOUT_S = 10  # a metadata request that takes longer than this counts as offline


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    subfolder: str
    kind: str  # "model" or "dataset"

    @property
    def uri(self) -> str:
        return PREFIX + "/".join(p for p in (self.repo_id, self.subfolder) if p)

    def local_dir(self, cache: Path) -> Path:
        return Path(cache).expanduser() / f"{self.kind}s" / self.repo_id

    def path_in(self, cache: Path) -> Path:
        return self.local_dir(cache) / self.subfolder if self.subfolder else self.local_dir(cache)


def is_hub(ref: str) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


def parse(ref: str, kind: str) -> HubRef:
    parts = ref[len(PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise PipelineError(f"bad hub reference {ref!r}: expected hf://owner/name or hf://owner/name/subfolder")
    return HubRef("/".join(parts[:2]), "/".join(parts[2:]), kind)


def model_patterns(ref: HubRef) -> list[list[str]]:
    """Alternatives in order of preference: safetensors weights, else the pickled .bin."""
    sub = f"{ref.subfolder}/" if ref.subfolder else ""
    return [[f"{sub}config.json", f"{sub}*.safetensors"], [f"{sub}config.json", f"{sub}pytorch_model.bin"]]


def bert_patterns(ref: HubRef) -> list[list[str]]:
    """A BERT model folder: its config and WordPiece vocabulary with safetensors weights, else the .bin."""
    sub = f"{ref.subfolder}/" if ref.subfolder else ""
    return [[f"{sub}config.json", f"{sub}vocab.txt", f"{sub}model.safetensors"],
            [f"{sub}config.json", f"{sub}vocab.txt", f"{sub}pytorch_model.bin"]]


def dataset_patterns(ref: HubRef, split: str) -> list[list[str]]:
    sub = f"{ref.subfolder}/" if ref.subfolder else ""
    return [[f"{sub}{split}-*.parquet", f"{sub}data/{split}-*.parquet"]]


def sha256(path: Path) -> str:
    return sha256_file(path).hexdigest()



def _snapshot(ref: HubRef, patterns: list[str], cache: Path) -> list[Path]:
    from huggingface_hub import snapshot_download

    folder = snapshot_download(ref.repo_id, repo_type=ref.kind, local_dir=ref.local_dir(cache),
                               allow_patterns=patterns, etag_timeout=ETAG_TIMEOUT_S)
    root = Path(folder)
    return sorted(p for pattern in patterns for p in root.glob(pattern) if p.is_file())


def _is_connection_problem(exc: Exception) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)) or any(
        word in text for word in ("connect", "timed out", "timeout", "offline", "resolve", "network"))


def fetch(items: list[tuple[str, HubRef, list[list[str]]]], cache: Path, *,
          download: Callable[[HubRef, list[str], Path], list[Path]] = _snapshot,
          progress: Callable = lambda it, **kw: it) -> dict:
    """Download every (name, ref, pattern alternatives) into `cache`; return the manifest.

    Downloads resume where an earlier attempt stopped (huggingface_hub keeps partial files
    in the local folder). At the first connection failure the remaining items are not tried,
    so an offline machine fails at once, with the full list of what is missing.
    """
    cache = Path(cache).expanduser()
    manifest_path = cache / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    missing: list[str] = []
    offline_reason = None
    for name, ref, alternatives in progress(items, desc="fetch", unit="item"):
        if offline_reason:
            missing.append(f"{name}: {ref.uri} -> {ref.path_in(cache)}")
            continue
        files, error = [], None
        for patterns in alternatives:
            try:
                files = download(ref, patterns, cache)
            except Exception as exc:  # huggingface_hub raises many types; sorted out below
                error = exc
                if _is_connection_problem(exc):
                    break
            if files:
                break
        if files:
            manifest[ref.uri] = {"name": name, "kind": ref.kind, "files": [
                {"path": str(f), "bytes": f.stat().st_size, "sha256": sha256(f)} for f in files]}
            continue
        missing.append(f"{name}: {ref.uri} -> {ref.path_in(cache)}")
        if error is not None and _is_connection_problem(error):
            offline_reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    cache.mkdir(parents=True, exist_ok=True)
    write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    if missing:
        why = (f"the Hugging Face Hub cannot be reached ({offline_reason})" if offline_reason
               else "these were not found on the Hub (check the names in params `source`)")
        raise PipelineError(
            f"{len(missing)} of {len(items)} downloads missing: {why}.\n  " + "\n  ".join(missing) +
            "\nTo provide them by hand, download them on a machine with network (e.g. "
            "`hf download OWNER/NAME --local-dir DIR`, add `--repo-type dataset` for datasets), "
            "copy them to the folders shown, or point params `source` at local files and folders.")
    return manifest
