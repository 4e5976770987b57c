import pytest
import torch

from zeroseg.trainer.model import num_kept, random_masking


def _tokens(batch: int, length: int, dim: int = 3) -> torch.Tensor:
    """Token l of every sample holds the value l in all channels: (B, L, D)."""
    return torch.arange(length, dtype=torch.float32)[None, :, None].expand(batch, length, dim).contiguous()


def test_keeps_int_of_length_times_one_minus_ratio():
    assert num_kept(196, 0.75) == 49
    assert num_kept(196, 0.6) == 78
    assert num_kept(16, 0.6) == 6
    tokens = _tokens(4, 10)
    masked = random_masking(tokens, 0.6, torch.Generator().manual_seed(0))
    assert masked.kept.shape == (4, 4, 3)
    assert masked.ids_keep.shape == (4, 4)
    assert masked.mask.shape == masked.ids_restore.shape == (4, 10)
    assert masked.mask.sum(dim=1).tolist() == [6.0] * 4
    assert set(masked.mask.unique().tolist()) == {0.0, 1.0}


def test_kept_tokens_are_the_unmasked_ones():
    tokens = _tokens(3, 20)
    masked = random_masking(tokens, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(masked.kept[..., 0], masked.ids_keep.float())
    assert torch.equal(torch.gather(masked.mask, 1, masked.ids_keep), torch.zeros(3, 10))


def test_samples_get_different_masks():
    masked = random_masking(_tokens(8, 49), 0.75, torch.Generator().manual_seed(2))
    rows = {tuple(row.tolist()) for row in masked.mask}
    assert len(rows) == 8


def test_generator_makes_masking_reproducible():
    tokens = _tokens(2, 16)
    first = random_masking(tokens, 0.6, torch.Generator().manual_seed(3))
    second = random_masking(tokens, 0.6, torch.Generator().manual_seed(3))
    assert torch.equal(first.mask, second.mask)
    assert torch.equal(first.ids_restore, second.ids_restore)


def test_ids_restore_unshuffles_to_raster_order():
    batch, length, keep = 5, 12, 3
    tokens = _tokens(batch, length)
    masked = random_masking(tokens, 0.75, torch.Generator().manual_seed(4))
    # as the decoder does it: visible tokens then placeholders, gathered back with ids_restore
    placeholders = torch.full((batch, length - keep, 3), -1.0)
    restored = torch.gather(
        torch.cat([masked.kept, placeholders], dim=1), 1, masked.ids_restore[:, :, None].expand(-1, -1, 3)
    )
    visible = masked.mask == 0
    assert torch.equal(restored[visible], tokens[visible])
    assert torch.equal(restored[~visible], torch.full_like(tokens[~visible], -1.0))
    # ids_restore is a permutation whose inverse starts with the kept ids
    assert torch.equal(torch.argsort(masked.ids_restore, dim=1)[:, :keep], masked.ids_keep)


def test_ratio_that_keeps_nothing_is_an_error():
    with pytest.raises(ValueError, match="keeps 0 of 4"):
        random_masking(_tokens(1, 4), 0.9)
