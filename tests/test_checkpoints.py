"""Checkpoints are identical files when their tensors and metadata are (stable dvc.lock)."""
import subprocess
import sys

from tests.conftest import ROOT

WRITE = """
import sys, torch
from pipeline.models.checkpoints import save_state
state = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(4)}
save_state(sys.argv[1], state, task="digits", method="ties_merging", key="ties", source="x", format="open_clip")
"""


def test_the_same_checkpoint_written_by_two_processes_is_byte_identical(tmp_path):
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path in paths:
        subprocess.run([sys.executable, "-c", WRITE, str(path)], cwd=ROOT, check=True)
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_which_file(tmp_path):
    """A file-size limit stands in for a full disk: WriteError names the file, nothing half-written remains."""
    path = tmp_path / "c.safetensors"
    subprocess.run([sys.executable, "-c", WRITE, str(path)], cwd=ROOT, check=True)
    before = path.read_bytes()
    big = WRITE.replace("torch.ones(4)", "torch.ones(100_000)")
    limited = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n" + big
    done = subprocess.run([sys.executable, "-c", limited, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "WriteError" in done.stderr
    assert f"could not write {path}: File too large; its previous content is unchanged" in done.stderr
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))
