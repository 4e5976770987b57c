"""The changed last blocks of SCLIP, ClearCLIP and NACLIP, each against its formula written out here per head
on the tiny random open_clip ViT (2 heads); the unchanged part of the tower against open_clip's own forward;
a background class through the shared pixel decision."""

import math

import pytest
import torch

from tests.conftest import TINY_TEACHER
from zeroseg.evaluation.dense_clip import attend, dense_features, head_projections, tokens_before_last_block
from zeroseg.pipeline.teacher import create_clip, resolve_identity


@pytest.fixture(scope="module")
def visual():
    torch.manual_seed(0)
    model = create_clip(resolve_identity(str(TINY_TEACHER), "none"), torch.device("cpu"))
    return model.visual.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))  # token grid 4 x 6


def heads(visual, x: torch.Tensor):
    """The last block's per-head projections written out: y = ln_1(x); q_h = y W_q,h^T + b_q,h etc. [B, H, N, d]."""
    block = visual.transformer.resblocks[-1]
    y = block.ln_1(x)
    weight, bias = block.attn.in_proj_weight, block.attn.in_proj_bias
    width, count = y.shape[-1], block.attn.num_heads
    d = width // count
    out = []
    for part in range(3):  # q, k, v
        rows = slice(part * width, (part + 1) * width)
        projected = y @ weight[rows].T + bias[rows]  # [B, N, width]
        out.append(torch.stack([projected[..., h * d : (h + 1) * d] for h in range(count)], dim=1))
    return (*out, d)


def mix(visual, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out_proj(concat_h A_h v_h): [B, H, N, N], [B, H, N, d] -> [B, N, width]."""
    concatenated = torch.cat([weights[:, h] @ v[:, h] for h in range(v.shape[1])], dim=-1)
    out_proj = visual.transformer.resblocks[-1].attn.out_proj
    return concatenated @ out_proj.weight.T + out_proj.bias


def to_joint_space(visual, tokens: torch.Tensor) -> torch.Tensor:
    return visual.ln_post(tokens[:, 1:]) @ visual.proj  # [B, h*w, D]


def test_the_unchanged_tower_equals_open_clips_own_forward(visual, images):
    square = images[..., :32]  # CLIP's own 32 x 32 input: no positional resize
    with torch.no_grad():
        before = visual(square)
        x, grid = tokens_before_last_block(visual, square)
        expected = visual._embeds(square)
        for block in visual.transformer.resblocks[:-1]:
            expected = block(expected)
        torch.testing.assert_close(x, expected)
        assert grid == (4, 4)
        block = visual.transformer.resblocks[-1]
        q, k, v = head_projections(block, block.ln_1(x))
        standard = attend(block, ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1), v)
        y = block.ln_1(x)
        torch.testing.assert_close(standard, block.attn(y, y, y, need_weights=False)[0], atol=1e-5, rtol=1e-5)
        for method in ("maskclip", "sclip", "clearclip", "naclip"):
            dense_features(visual, images, method)
        torch.testing.assert_close(visual(square), before)  # the model itself is left as it was


def test_sclip_is_correlative_self_attention_with_residual_and_mlp(visual, images):
    with torch.no_grad():
        x, _ = tokens_before_last_block(visual, images)
        q, k, v, d = heads(visual, x)
        query_query = (q @ q.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
        weights = query_query + (k @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
        block = visual.transformer.resblocks[-1]
        after = x + mix(visual, weights, v)
        expected = to_joint_space(visual, after + block.mlp(block.ln_2(after)))
        features, grid = dense_features(visual, images, "sclip")
    assert features.shape == (2, 24, 32) and grid == (4, 6)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)


def test_clearclip_is_query_query_attention_without_residual_or_mlp(visual, images):
    with torch.no_grad():
        x, _ = tokens_before_last_block(visual, images)
        q, _, v, d = heads(visual, x)
        expected = to_joint_space(visual, mix(visual, (q @ q.transpose(-1, -2) / math.sqrt(d)).softmax(-1), v))
        features, _ = dense_features(visual, images, "clearclip")
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)


def gaussian_written_out(rows: int, cols: int, std: float) -> torch.Tensor:
    """[1 + h*w, 1 + h*w]: exp(-((i - m)^2 + (j - n)^2) / (2 std^2)) between patches (i, j), (m, n) in row-major
    order; 0 for the class token."""
    size = 1 + rows * cols
    prior = torch.zeros(size, size)
    for p in range(rows * cols):
        for r in range(rows * cols):
            (i, j), (m, n) = divmod(p, cols), divmod(r, cols)
            prior[1 + p, 1 + r] = math.exp(-((i - m) ** 2 + (j - n) ** 2) / (2 * std**2))
    return prior


@pytest.mark.parametrize("std", [5.0, 1.0])
def test_naclip_is_key_key_attention_with_a_gaussian_neighbourhood_and_no_mlp(visual, images, std):
    with torch.no_grad():
        x, _ = tokens_before_last_block(visual, images)
        _, k, v, d = heads(visual, x)
        weights = (k @ k.transpose(-1, -2) / math.sqrt(d) + gaussian_written_out(4, 6, std)).softmax(-1)
        expected = to_joint_space(visual, mix(visual, weights, v))
        features, _ = dense_features(visual, images, "naclip", gaussian_std=std)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)
