import dataclasses

import pytest
import torch

from zeroseg.pipeline.store_meta import view_layout
from zeroseg.trainer.losses import LossConfig, distillation_loss, reconstruction_loss, segment_matching_loss, total_loss
from zeroseg.trainer.model import ZeroSegOutput
from zeroseg.trainer.model_config import model_preset


def test_reconstruction_loss_averages_masked_patches_only():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [9.0, 9.0]]])
    target = torch.tensor([[[0.0, 0.0], [5.0, 5.0], [9.0, 9.0]]])
    # patch MSEs: (1 + 4) / 2 = 2.5, 25, 0
    assert reconstruction_loss(pred, target, torch.tensor([[1.0, 0.0, 0.0]]), False).item() == 2.5
    assert reconstruction_loss(pred, target, torch.tensor([[1.0, 1.0, 0.0]]), False).item() == 13.75
    assert reconstruction_loss(pred, target, torch.tensor([[1.0, 1.0, 1.0]]), False).item() == pytest.approx(
        27.5 / 3
    )


def test_reconstruction_loss_normalises_each_target_patch():
    # patch [1, 3]: mean 2, unbiased variance 2 -> [-1, 1] / sqrt(2 + 1e-6); pred 0 -> MSE 1 / (2 + 1e-6)
    pred = torch.zeros(1, 1, 2)
    target = torch.tensor([[[1.0, 3.0]]])
    loss = reconstruction_loss(pred, target, torch.ones(1, 1), True)
    assert loss.item() == pytest.approx(1 / (2 + 1e-6), rel=1e-6)
    # a prediction equal to the normalised target costs nothing
    pred = torch.tensor([[[-1.0, 1.0]]]) / (2 + 1e-6) ** 0.5
    assert reconstruction_loss(pred, target, torch.ones(1, 1), True).item() == pytest.approx(0.0, abs=1e-12)


def test_distillation_loss_sums_l1_over_views_and_averages_batch():
    z = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    v = torch.tensor([[[0.0, 0.0], [1.0, -1.0], [3.0, 2.0]], [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    # sample 0: |(1, 2)| + |(0, 3)| + |(-2, 0)| = 3 + 3 + 2 = 8; sample 1: 0
    assert distillation_loss(z, v).item() == 4.0
    assert distillation_loss(z, v, "mean").item() == 2.0


def test_segment_matching_loss_takes_nearest_local_view_per_segment():
    g = torch.tensor([[[0.0, 0.0], [2.0, 2.0]]])
    v_local = torch.tensor([[[1.0, 0.0], [3.0, 3.0], [0.0, -2.0]]])
    # g_0: distances 1, 6, 2 -> 1; g_1: distances 3, 2, 6 -> 2
    assert segment_matching_loss(g, v_local).item() == 3.0
    assert segment_matching_loss(g, v_local, "mean").item() == 1.5
    g_batch = torch.cat([g, v_local[:, :2]])  # second sample: both segments sit on a view
    assert segment_matching_loss(g_batch, v_local.expand(2, -1, -1)).item() == 1.5


def test_matching_gradient_reaches_the_nearest_view_only():
    g = torch.tensor([[[0.0, 0.0]]], requires_grad=True)
    v_local = torch.tensor([[[1.0, -1.0], [5.0, 5.0]]])
    segment_matching_loss(g, v_local).backward()
    assert g.grad.tolist() == [[[-1.0, 1.0]]]


def _output(images: torch.Tensor) -> ZeroSegOutput:
    """Fixed outputs with hand-checkable losses against `_features`: 1 masked patch of zeros vs ones."""
    return ZeroSegOutput(
        g=torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]),
        z=torch.tensor([[1.0, 1.0]]),
        pred=torch.zeros(1, 2, 8 * 8 * 3),
        mask=torch.tensor([[1.0, 0.0]]),
        soft_assignments=[],
        hard_assignments=[],
        ids_keep=torch.tensor([[1]]),
        grid_size=(1, 2),
    )


def _features() -> torch.Tensor:
    # layout of grids (1, 2): whole image, then the 2x2 cells
    return torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]]).half()


def _images() -> torch.Tensor:
    images = torch.ones(1, 3, 8, 16)
    images[..., 8:] = 2.0  # patch 0 all ones, patch 1 all twos
    return images


def test_total_loss_weights_the_three_terms():
    model_cfg = model_preset("tiny")
    cfg = LossConfig(
        w_recon=1.0, w_distill=0.5, w_match=2.0, grids=(1, 2), normalize_targets=False, l1_reduction="sum",
        norm_pix_loss=False,
    )
    losses = total_loss(_output(_images()), _images(), _features(), view_layout((1, 2)), cfg, model_cfg)
    # recon: masked patch 0, zeros vs ones -> 1
    # distill: z = (1, 1) vs the 5 views -> 0 + 1 + 1 + 3 + 3 = 8
    # match: g_0 = (1, 0) sits on view 1 -> 0; g_1 = (0, 0) is 1 from every local view -> 1
    assert {name: value.item() for name, value in losses.items()} == {
        "recon": 1.0,
        "distill": 8.0,
        "match": 1.0,
        "total": 1.0 + 0.5 * 8.0 + 2.0 * 1.0,
    }


def test_total_loss_selects_views_by_grid():
    model_cfg = model_preset("tiny")
    layout = view_layout((1, 2))
    global_only = LossConfig(grids=(1,), normalize_targets=False)
    losses = total_loss(_output(_images()), _images(), _features(), layout, global_only, model_cfg)
    assert (losses["distill"].item(), losses["match"].item()) == (0.0, 0.0)
    local_distill = LossConfig(grids=(1, 2), distill_grids=(2,), normalize_targets=False, l1_reduction="sum")
    losses = total_loss(_output(_images()), _images(), _features(), layout, local_distill, model_cfg)
    assert (losses["distill"].item(), losses["match"].item()) == (8.0, 1.0)
    with pytest.raises(ValueError, match=r"grids \[3\] are not in the stored views"):
        total_loss(_output(_images()), _images(), _features(), layout, LossConfig(grids=(1, 3)), model_cfg)


def test_total_loss_normalises_teacher_features():
    model_cfg = model_preset("tiny")
    output = dataclasses.replace(_output(_images()), pred=None, z=torch.tensor([[0.6, 0.8]]))
    features = torch.tensor([[[3.0, 4.0], [5.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, -7.0]]])
    losses = total_loss(output, _images(), features, view_layout((1, 2)), LossConfig(grids=(1,)), model_cfg)
    # (3, 4) / 5 = z exactly; no masked patch -> no reconstruction term
    assert losses["distill"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["recon"].item() == 0.0
