import math

import pytest
import torch
import torch.nn.functional as F

from zeroseg.errors import UserError
from zeroseg.pipeline.store_meta import view_layout
from zeroseg.trainer.grouping import (
    CrossAttentionBlock,
    GroupingBlock,
    GroupingStage,
    gumbel_from_uniform,
    gumbel_straight_through,
    straight_through,
)
from zeroseg.trainer.losses import LossConfig, total_loss
from zeroseg.trainer.model import ZeroSeg, patchify
from zeroseg.trainer.model_config import ModelConfig, model_preset
from zeroseg.trainer.vit import interpolate_pos_embed, sincos_pos_embed_2d


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of trainer.model.patchify: (B, rows * cols, p * p * C) -> (B, C, rows * p, cols * p)."""
    batch = patches.shape[0]
    p = patch_size
    rows, cols = grid_size
    chans = patches.shape[-1] // (p * p)
    x = patches.reshape(batch, rows, cols, p, p, chans)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, rows, p, cols, p)
    return x.reshape(batch, chans, rows * p, cols * p)


def _assert_one_hot(assignment: torch.Tensor) -> None:
    """(B, N, G) holds exactly one 1 per row, zeros elsewhere."""
    expected = F.one_hot(assignment.argmax(dim=-1), assignment.shape[-1]).to(assignment.dtype)
    assert torch.equal(assignment, expected)


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    return model_preset("tiny")


def test_presets_hold_the_paper_sizes():
    base = model_preset("base")
    assert (base.image_size, base.patch_size, base.in_chans) == (224, 16, 3)
    assert (base.embed_dim, base.depth, base.num_heads, base.mlp_ratio) == (768, 12, 12, 4.0)
    assert (base.decoder_embed_dim, base.decoder_depth, base.decoder_num_heads) == (512, 8, 16)
    assert (base.seg_depths, base.num_group_tokens, base.teacher_dim) == ((2, 2, 1), (32, 8), 768)
    assert (base.mask_ratio, base.gumbel_tau, LossConfig().norm_pix_loss) == (0.6, 1.0, True)
    assert ModelConfig.from_dict(model_preset("tiny").to_dict()) == model_preset("tiny")
    with pytest.raises(UserError, match="^model.preset 'huge' is not one of base, tiny$"):
        model_preset("huge")
    with pytest.raises(UserError, match=r"^model.seg_depths \(2, 2\) needs one entry per grouping stage"):
        ModelConfig(seg_depths=(2, 2))


def test_sincos_pos_embed_known_entries():
    # dim 8: 4 channels for the column then 4 for the row; frequencies 1 and 1/100
    embed = sincos_pos_embed_2d(8, (2, 3))
    assert embed.shape == (6, 8)
    assert embed[0].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    row, col = 1, 2  # token 5 in raster order
    expected = [
        math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100),
        math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100),
    ]  # fmt: skip
    assert embed[row * 3 + col].tolist() == pytest.approx(expected, abs=1e-7)


def test_pos_embed_interpolation():
    embed = sincos_pos_embed_2d(16, (4, 4))[None]
    assert interpolate_pos_embed(embed, (4, 4), (4, 4)) is embed
    assert interpolate_pos_embed(embed, (4, 4), (6, 10)).shape == (1, 60, 16)
    constant = torch.full((1, 16, 16), 0.5)  # bicubic keeps a constant field constant
    assert torch.allclose(interpolate_pos_embed(constant, (4, 4), (8, 12)), torch.full((1, 96, 16), 0.5))


def test_patchify_round_trip_on_non_square_images():
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 6, 192)
    assert torch.equal(patches[0, 1], images[0, :, 0:8, 8:16].permute(1, 2, 0).flatten())  # (row, col, chan)
    assert torch.equal(unpatchify(patches, 8, (2, 3)), images)


def test_straight_through_is_one_hot_forward_and_softmax_backward():
    logits = torch.randn(3, 5, 7, requires_grad=True)
    weights = torch.randn(3, 5, 7)
    hard = straight_through(logits.softmax(dim=1), dim=1)
    assert torch.equal(hard, F.one_hot(logits.argmax(dim=1), 5).transpose(1, 2).float())
    (hard * weights).sum().backward()
    reference = logits.detach().clone().requires_grad_()
    (reference.softmax(dim=1) * weights).sum().backward()
    assert torch.allclose(logits.grad, reference.grad)


@pytest.mark.parametrize("training", [True, False])
def test_grouping_block_assigns_each_token_to_one_group(training: bool):
    torch.manual_seed(0)
    block = GroupingBlock(
        dim=16, num_heads=2, num_group_tokens=6, num_output_groups=3, mlp_ratio=4.0, gumbel_tau=1.0
    )
    block.train(training)
    tokens, group_tokens = torch.randn(2, 10, 16), torch.randn(2, 6, 16, requires_grad=True)
    segments, hard, soft = block(tokens, group_tokens)
    assert segments.shape == (2, 3, 16)
    assert hard.shape == soft.shape == (2, 10, 3)
    _assert_one_hot(hard)
    assert torch.allclose(soft.sum(dim=-1), torch.ones(2, 10))
    if not training:
        assert torch.equal(hard.argmax(dim=-1), soft.argmax(dim=-1))

    (segments * torch.randn_like(segments)).sum().backward()
    for weight in (block.assign.q_proj.weight, block.assign.k_proj.weight, block.token_mixer.mlp.fc1.weight):
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    assert group_tokens.grad.abs().sum() > 0


def test_the_cross_attention_block_has_groupvits_norms_only():
    """GroupViT's CrossAttnBlock(post_norm=True): no norm on the query and key inputs."""
    torch.manual_seed(0)
    block = CrossAttentionBlock(dim=16, num_heads=2, mlp_ratio=4.0)
    norms = sorted(name for name, module in block.named_modules() if isinstance(module, torch.nn.LayerNorm))
    assert norms == ["norm_mlp", "norm_out"]
    groups, tokens = torch.randn(2, 3, 16), torch.randn(2, 10, 16)
    with torch.no_grad():
        attended = groups + block.attn(groups, tokens)  # the raw inputs go into the attention
        expected = block.norm_out(attended + block.mlp(block.norm_mlp(attended)))
        assert torch.allclose(block(groups, tokens), expected)
        # scaling the tokens changes the result: nothing normalises them inside the block
        assert not torch.allclose(block(groups, 3 * tokens), block(groups, tokens))


def test_gumbel_noise_is_float32_finite_even_at_u_zero_and_outside_autocast():
    noise = gumbel_from_uniform(torch.tensor([0.0, 0.5, 1.0], dtype=torch.bfloat16))
    assert noise.dtype == torch.float32 and torch.isfinite(noise).all()
    assert noise[1].item() == pytest.approx(-math.log(math.log(2.0)))
    logits = torch.randn(2, 4, 6, dtype=torch.bfloat16, requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hard = gumbel_straight_through(logits, tau=1.0, dim=1, generator=generator)
    assert hard.dtype == torch.bfloat16
    _assert_one_hot(hard.transpose(1, 2))
    again = gumbel_straight_through(logits, tau=1.0, dim=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(hard, again)  # the generator alone decides the noise
    (hard.float() * torch.randn(2, 4, 6)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_assignment_gradient_flows_through_the_hard_map():
    torch.manual_seed(1)
    stage = GroupingStage(dim=16, num_heads=2, depth=1, num_group_tokens=4, num_prev_group_tokens=None,
                          mlp_ratio=4.0, gumbel_tau=1.0)  # fmt: skip
    _, _, hard, _ = stage(torch.randn(2, 9, 16))
    _assert_one_hot(hard)
    (hard * torch.randn_like(hard)).sum().backward()  # only the straight-through path reaches the logits
    assert stage.group_tokens.grad.abs().sum() > 0
    assert stage.grouping.assign.q_proj.weight.grad.abs().sum() > 0
    assert stage.grouping.assign.k_proj.weight.grad.abs().sum() > 0
    assert stage.grouping.assign.v_proj.weight.grad is None


def test_train_forward_shapes_with_masking(tiny: ModelConfig):
    torch.manual_seed(0)
    model = ZeroSeg(tiny).train()
    images = torch.randn(2, 3, 32, 32)
    out = model(images, generator=torch.Generator().manual_seed(0))
    length, seen = 16, 6  # 4x4 patches of 8, int(16 * 0.4) kept
    assert out.g.shape == (2, 4, 32)
    assert out.z.shape == (2, 32)
    assert out.pred.shape == (2, length, 8 * 8 * 3)
    assert out.mask.shape == (2, length) and out.mask.sum(dim=1).tolist() == [length - seen] * 2
    assert out.ids_keep.shape == (2, seen)
    assert torch.equal(torch.gather(out.mask, 1, out.ids_keep), torch.zeros(2, seen))
    assert out.grid_size == (4, 4)
    assert [m.shape for m in out.soft_assignments] == [(2, seen, 8), (2, 8, 4)]
    assert [m.shape for m in out.hard_assignments] == [(2, seen, 8), (2, 8, 4)]
    for soft, hard in zip(out.soft_assignments, out.hard_assignments, strict=True):
        assert torch.allclose(soft.sum(dim=-1), torch.ones(soft.shape[:2]))
        _assert_one_hot(hard)


def test_training_step_reaches_every_parameter(tiny: ModelConfig):
    torch.manual_seed(0)
    model = ZeroSeg(tiny).train()
    images = torch.randn(2, 3, 32, 32)
    out = model(images, generator=torch.Generator().manual_seed(1))
    features = torch.randn(2, 30, tiny.teacher_dim).half()
    losses = total_loss(out, images, features, view_layout((1, 2, 3, 4)), LossConfig(), tiny)
    assert all(torch.isfinite(value) for value in losses.values())
    losses["total"].backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_eval_forward_on_a_larger_non_square_input(tiny: ModelConfig):
    model = ZeroSeg(tiny).eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = model(images)
        again = model(images)
    rows, cols = 8, 12
    assert out.grid_size == (rows, cols)
    assert out.pred is None
    assert torch.equal(out.mask, torch.zeros(1, rows * cols))
    assert torch.equal(out.ids_keep, torch.arange(rows * cols)[None])
    assert out.g.shape == (1, 4, 32) and out.z.shape == (1, 32)
    assert [m.shape for m in out.soft_assignments] == [(1, rows * cols, 8), (1, 8, 4)]
    for soft, hard in zip(out.soft_assignments, out.hard_assignments, strict=True):
        assert torch.allclose(soft.sum(dim=-1), torch.ones(soft.shape[:2]))
        _assert_one_hot(hard)
        assert torch.equal(hard.argmax(dim=-1), soft.argmax(dim=-1))
    composed = out.soft_assignments[0] @ out.soft_assignments[1]  # (1, HW, 8) @ (1, 8, 4): pixels to segments
    assert torch.allclose(composed.sum(dim=-1), torch.ones(1, rows * cols))
    assert torch.equal(out.g, again.g)  # no noise at test time


def test_explicit_mask_ratio_in_eval_mode_reconstructs(tiny: ModelConfig):
    model = ZeroSeg(tiny).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 48), mask_ratio=0.5)
    assert out.pred.shape == (1, 24, 192)
    assert out.mask.sum().item() == 12


def test_input_not_a_multiple_of_the_patch_is_rejected(tiny: ModelConfig):
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        ZeroSeg(tiny).eval()(torch.randn(1, 3, 30, 32))
