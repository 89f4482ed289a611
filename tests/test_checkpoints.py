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
