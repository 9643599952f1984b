"""The frozen CLIP text encoder: local from_pretrained loading, normalized embeddings, ITC end to end."""

import pytest
import torch

from muse.config import load_config
from muse.models import ClipTextEncoder, MuseTokenizer


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config("tiny")


def test_loads_from_a_local_folder_and_returns_unit_embeddings(tiny_cfg, tmp_path):
    torch.manual_seed(0)
    encoder = ClipTextEncoder(tiny_cfg.model.text)
    encoder.model.save_pretrained(tmp_path / "clip")
    loaded = ClipTextEncoder(load_config("tiny", [f"model.text.pretrained={tmp_path / 'clip'}",
                                                  "model.text.random_init=false"]).model.text)
    ids = torch.randint(0, 1000, (3, 7))
    emb = loaded(ids)
    assert emb.shape == (3, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(emb, encoder(ids))
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.train()
    assert not loaded.model.training


def test_itc_end_to_end(tiny_cfg):
    torch.manual_seed(0)
    text = ClipTextEncoder(tiny_cfg.model.text)
    model = MuseTokenizer(tiny_cfg.model)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(images, text_embeds=text(torch.randint(0, 1000, (2, 5))))
    out.loss_itc.backward()
    assert model.logit_scale.grad is not None and model.semantic_projector[0].weight.grad.abs().sum() > 0


def test_embed_dim_mismatch_is_reported(tiny_cfg, tmp_path):
    ClipTextEncoder(tiny_cfg.model.text).model.save_pretrained(tmp_path / "clip")
    cfg = load_config("tiny", [f"model.text.pretrained={tmp_path / 'clip'}", "model.text.embed_dim=32",
                               "model.text.random_init=false"]).model.text
    with pytest.raises(ValueError, match="text.embed_dim is 32"):
        ClipTextEncoder(cfg)
