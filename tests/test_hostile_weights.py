"""Teacher weights files that could run code: --pretrained FILE reaches open_clip's load_checkpoint, whose
torch.load is weights_only=True (open_clip 3.x no longer sends a file to its OpenAI loader, which calls
torch.jit.load and torch.load without it): a crafted pickle and a TorchScript archive are refused in one line and
run nothing."""

import os

import pytest
import torch

from tests.conftest import TINY_TEACHER, invoke
from zeroseg.pipeline.cli import main as zs_cache


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls os.system: what a hostile checkpoint does
        return os.system, (f"touch {self.marker}",)


class Scripted(torch.nn.Module):
    def forward(self, x):
        return x + 1


@pytest.mark.parametrize("kind", ["pickle", "torchscript"])
def test_a_weights_file_that_would_run_code_is_refused_in_one_line(photos, tmp_path, kind):
    marker, weights = tmp_path / "code-ran", tmp_path / "ViT-B-32.pt"
    if kind == "pickle":
        torch.save({"state_dict": RunsCode(marker)}, weights)
    else:
        torch.jit.save(torch.jit.script(Scripted()), weights)
    built = invoke(zs_cache, "build", photos, "--store", tmp_path / "store", "--teacher", TINY_TEACHER,
                   "--pretrained", weights, "--device", "cpu", "--no-progress")
    assert built.returncode == 2 and len(built.stderr.strip().splitlines()) == 1, built.stderr
    assert built.stderr.startswith(f"error: could not load teacher weights '{weights}' into zs-tiny-clip: ")
    assert not marker.exists() and not (tmp_path / "store").exists()
