"""Device names every command accepts: auto, cpu, cuda, cuda:K (checked to exist)."""

import pytest
import torch

from zeroseg.pipeline.errors import UserError
from zeroseg.pipeline.runtime import resolve_device


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
