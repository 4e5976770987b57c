"""Device names every command accepts: auto, cpu, cuda, cuda:K (checked to exist; auto warns when the job
asked for GPUs and none is visible)."""

import pytest
import torch

from tests.conftest import TINY_TEACHER, invoke
from zeroseg.errors import UserError
from zeroseg.pipeline.cli import main as zs_cache
from zeroseg.runtime import GPU_JOB_VARIABLES, resolve_device

CPU = torch.device("cpu")


def test_cpu_and_auto_without_a_gpu():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto", local_rank=3, world_size=4) == torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "message"),
    [("bogus", "unknown device 'bogus'"), ("mps", "unsupported device 'mps'")]
    + ([] if torch.cuda.is_available() else [("cuda:1", "no CUDA GPU is visible")]),
)
def test_bad_devices_are_user_errors(name, message):
    with pytest.raises(UserError, match=message):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is for a job without a visible GPU")
def test_auto_device_warns_when_the_job_asked_for_gpus(monkeypatch, capsys, photos, tmp_path):
    for name in GPU_JOB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert resolve_device("auto") == CPU and capsys.readouterr().err == ""
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    assert resolve_device("auto") == CPU
    warning = capsys.readouterr().err
    assert warning.startswith("WARNING: --device auto runs on the CPU") and "SLURM_GPUS_ON_NODE=4" in warning
    cuda = invoke(zs_cache, "build", photos, "--store", tmp_path / "s", "--teacher", TINY_TEACHER,
                  "--pretrained", "none", "--image-size", "32", "--no-progress", "--device", "cuda")  # fmt: skip
    lines = cuda.stderr.strip().splitlines()
    assert cuda.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("error: device 'cuda' asked for, but no CUDA GPU is visible")
    assert not (tmp_path / "s").exists()
