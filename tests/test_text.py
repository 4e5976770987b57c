from pathlib import Path

import pytest
import torch
from open_clip import get_tokenizer

from zeroseg.errors import UserError
from zeroseg.evaluation.loading import read_templates
from zeroseg.evaluation.text import DEFAULT_TEMPLATES, OPENAI_TEMPLATES, class_text_embeddings
from zeroseg.pipeline.teacher import create_clip, resolve_identity

TINY_CLIP = str(Path(__file__).parent / "fixtures" / "zs-tiny-clip.json")
NAMES = ["aeroplane", "table", "monitor"]


class CountingTextTower(torch.nn.Module):
    """The tiny CLIP, counting how many times its text tower runs."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip = clip
        self.calls = 0

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.clip.encode_text(tokens)


@pytest.fixture(scope="module")
def tiny():
    identity = resolve_identity(TINY_CLIP, "none")
    return identity, CountingTextTower(create_clip(identity, torch.device("cpu")))


def test_embeddings_are_unit_rows_of_the_mean_template_embedding(tiny, tmp_path):
    identity, model = tiny
    templates = ("a photo of a {}.", "a drawing of the {}.")
    embeddings = class_text_embeddings(model, identity, NAMES, templates, cache_dir=tmp_path)
    assert embeddings.shape == (3, 32) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))

    tokens = get_tokenizer(identity.model)([t.format("table") for t in templates])
    with torch.no_grad():
        per_template = torch.nn.functional.normalize(model.clip.encode_text(tokens), dim=-1)
    expected = torch.nn.functional.normalize(per_template.mean(dim=0), dim=-1)
    torch.testing.assert_close(embeddings[1], expected)


def test_second_call_reads_the_cache_without_running_the_text_tower(tiny, tmp_path):
    identity, model = tiny
    first = class_text_embeddings(model, identity, NAMES, cache_dir=tmp_path)
    calls_after_first = model.calls
    (entry,) = tmp_path.glob("*.pt")
    mtime = entry.stat().st_mtime_ns
    second = class_text_embeddings(model, identity, NAMES, cache_dir=tmp_path)
    assert model.calls == calls_after_first
    assert torch.equal(first, second)
    assert entry.stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".pt"]  # no temporary files left behind


def test_other_templates_or_weights_get_their_own_cache_entry(tiny, tmp_path):
    identity, model = tiny
    single = class_text_embeddings(model, identity, NAMES, cache_dir=tmp_path)
    calls = model.calls
    openai = class_text_embeddings(model, identity, NAMES, OPENAI_TEMPLATES, cache_dir=tmp_path)
    assert model.calls > calls
    assert len(OPENAI_TEMPLATES) == 80 and not torch.equal(single, openai)
    assert len(list(tmp_path.glob("*.pt"))) == 2

    other_weights = CountingTextTower(create_clip(identity, torch.device("cpu")))
    with torch.no_grad():
        other_weights.clip.text_projection.mul_(2)
    class_text_embeddings(other_weights, identity, NAMES, cache_dir=tmp_path)
    assert other_weights.calls == 1
    assert len(list(tmp_path.glob("*.pt"))) == 3


def test_templates_are_a_named_set_or_a_file(tmp_path):
    assert read_templates("single") == DEFAULT_TEMPLATES and read_templates("openai80") == OPENAI_TEMPLATES
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} in the wild\n\nart of a {}\n")
    assert read_templates(str(prompts)) == ("a {} in the wild", "art of a {}")
    with pytest.raises(UserError, match="neither single nor openai80 nor a file"):
        read_templates("openai")
    prompts.write_text("no placeholder\n")
    with pytest.raises(UserError, match="exactly one"):
        read_templates(str(prompts))
