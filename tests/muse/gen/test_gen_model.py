"""The generator and its flow-matching loss: eq. 6 by hand, CFG, label dropout, conditions, configs."""

import pytest
import torch

from muse.gen.config import FlowConfig, load_gen_config
from muse.gen.flow import flow_matching_loss, interpolate, sample_timesteps, velocity_target
from muse.gen.model import TIMESTEP_SCALE, LatentGenerator


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LatentGenerator(load_gen_config("gen/tiny").model).eval()


def test_loss_and_velocity_target_match_a_hand_computation(tiny):
    cfg = FlowConfig(timesteps="uniform", label_dropout=0.0)
    x0 = torch.randn(3, 8, 4, 4)
    labels = torch.tensor([0, 3, 9])
    seen = {}

    class Recorder(torch.nn.Module):
        # The real generator, with its inputs recorded: the loss must feed it x_t at t and compare to ε − x₀.
        def __init__(self):
            super().__init__()
            self.inner = tiny

        def drop_condition(self, condition, drop):
            return tiny.drop_condition(condition, drop)

        def forward(self, x_t, t, condition):
            seen.update(x_t=x_t, t=t, labels=condition["labels"])
            seen["prediction"] = tiny(x_t, t, condition)
            return seen["prediction"]

    loss, terms = flow_matching_loss(Recorder(), x0, {"labels": labels}, cfg, torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    t = torch.rand(3, generator=replay)
    noise = torch.randn(x0.shape, generator=replay)
    torch.testing.assert_close(seen["t"], t, rtol=0, atol=0)
    for i in range(3):  # eq. 6 element by element
        torch.testing.assert_close(seen["x_t"][i], (1 - t[i]) * x0[i] + t[i] * noise[i], rtol=0, atol=1e-7)
    assert torch.equal(velocity_target(x0, noise), noise - x0)
    expected = sum(((seen["prediction"][i] - (noise[i] - x0[i])) ** 2).sum() for i in range(3)) / x0.numel()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert torch.equal(seen["labels"], labels) and float(terms["dropped"]) == 0.0
    loss.backward()
    assert tiny.class_embedding.weight.grad is not None
    tiny.zero_grad(set_to_none=True)


def test_timesteps_follow_the_configured_distribution():
    generator = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20000, FlowConfig(timesteps="uniform"), generator, "cpu")
    assert 0 < uniform.min() and uniform.max() < 1 and abs(float(uniform.mean()) - 0.5) < 0.01
    assert abs(float(uniform.var()) - 1 / 12) < 0.003
    logit = sample_timesteps(20000, FlowConfig(logit_mean=0.5, logit_std=0.8), generator, "cpu")
    normal = torch.log(logit / (1 - logit))  # its logit is N(0.5, 0.8²)
    assert abs(float(normal.mean()) - 0.5) < 0.02 and abs(float(normal.std()) - 0.8) < 0.02


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_label_dropout_happens_at_the_configured_rate(tiny, rate):
    cfg = FlowConfig(label_dropout=rate)
    x0 = torch.zeros(4000, 8, 4, 4)
    labels = torch.randint(0, 10, (4000,), generator=torch.Generator().manual_seed(1))
    seen = {}

    def model(x_t, t, condition):
        seen["labels"] = condition["labels"]
        return torch.zeros_like(x_t)

    model.drop_condition = tiny.drop_condition
    _, terms = flow_matching_loss(model, x0, {"labels": labels}, cfg, torch.Generator().manual_seed(2))
    dropped = seen["labels"] == tiny.null_class
    # Binomial(4000, rate): 4 standard deviations.
    assert abs(float(dropped.float().mean()) - rate) < 4 * (rate * (1 - rate) / 4000) ** 0.5
    assert torch.equal(seen["labels"][~dropped], labels[~dropped]) and float(terms["dropped"]) == float(dropped.float().mean())


def test_guidance_scale_one_is_the_conditional_model_and_others_the_formula(tiny):
    x = torch.randn(2, 8, 4, 4)
    t = torch.tensor([0.3, 0.8])
    labels = torch.tensor([1, 4])
    with torch.no_grad():
        conditional = tiny(x, t, {"labels": labels})
        unconditional = tiny(x, t, {"labels": torch.full((2,), tiny.null_class)})
        assert torch.equal(tiny.guided_velocity(x, t, {"labels": labels}, 1.0), conditional)
        guided = tiny.guided_velocity(x, t, {"labels": labels}, 3.0)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(conditional, unconditional)  # the class does reach the output


def test_the_class_and_the_timestep_reach_sana_as_documented(tiny, monkeypatch):
    seen = {}
    original = tiny.transformer.forward

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(tiny.transformer, "forward", spy)
    with torch.no_grad():
        tiny(torch.zeros(2, 8, 4, 4), torch.tensor([0.25, 1.0]), {"labels": torch.tensor([2, 10])})
    assert seen["encoder_hidden_states"].shape == (2, 1, 32)
    assert torch.equal(seen["encoder_hidden_states"][:, 0], tiny.class_embedding.weight[[2, 10]])
    assert torch.equal(seen["timestep"], torch.tensor([0.25, 1.0]) * TIMESTEP_SCALE)


def test_text_condition_with_a_learned_null_caption():
    cfg = load_gen_config("gen/tiny", ["model.condition=text", "model.caption_channels=12"]).model
    torch.manual_seed(0)
    model = LatentGenerator(cfg).eval()
    captions = torch.randn(3, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    dropped = model.drop_condition({"captions": captions, "caption_mask": mask}, torch.tensor([False, True, False]))
    assert torch.equal(dropped["captions"][0], captions[0]) and torch.equal(dropped["caption_mask"][0], mask[0])
    assert torch.equal(dropped["captions"][1], model.null_caption[0].expand(5, 12))
    assert dropped["caption_mask"][1].tolist() == [1, 0, 0, 0, 0]
    x, t = torch.randn(3, 8, 4, 4), torch.full((3,), 0.5)
    with torch.no_grad():
        out = model(x, t, {"captions": captions, "caption_mask": mask})
        # Masked-out tokens do not matter.
        changed = captions.clone()
        changed[0, 3:] = 100.0
        torch.testing.assert_close(model(x, t, {"captions": changed, "caption_mask": mask})[0], out[0])
        conditional = model.guided_velocity(x, t, {"captions": captions, "caption_mask": mask}, 1.0)
    assert torch.equal(conditional, out) and out.shape == x.shape
    with pytest.raises(ValueError, match="captions must be"):
        model(x, t, {"captions": torch.randn(3, 5, 7)})


def test_bad_class_ids_and_statistics_are_named(tiny):
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 10\]"):
        tiny(torch.zeros(1, 8, 4, 4), torch.zeros(1), {"labels": torch.tensor([11])})
    with pytest.raises(ValueError, match="latent std must be > 0"):
        LatentGenerator(tiny.cfg).set_latent_stats(torch.zeros(8), torch.zeros(8))
    model = LatentGenerator(tiny.cfg)
    model.set_latent_stats(torch.arange(8.0), torch.full((8,), 2.0))
    latents = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(model.denormalize(model.normalize(latents)), latents)
    assert torch.equal(model.normalize(latents)[:, 3], (latents[:, 3] - 3) / 2)


def test_sana_sizes_are_diffusers_and_unknown_keys_are_refused():
    from muse.gen.model import build_sana

    small, large = load_gen_config("gen/sana_600m").model, load_gen_config("gen/sana_1600m").model
    assert (small.num_layers, small.width, small.num_cross_attention_heads * small.cross_attention_head_dim) == (28, 1152, 1152)
    assert (large.num_layers, large.width, large.num_cross_attention_heads * large.cross_attention_head_dim) == (20, 2240, 2240)
    with torch.device("meta"):
        counts = [sum(p.numel() for p in build_sana(c).parameters()) / 1e9 for c in (small, large)]
    assert 0.55 < counts[0] < 0.65 and 1.5 < counts[1] < 1.7, counts
    with pytest.raises(ValueError, match=r"unknown config key\(s\) model.layers"):
        load_gen_config("gen/tiny", ["model.layers=3"])
    with pytest.raises(ValueError, match="flow.timesteps must be"):
        load_gen_config("gen/tiny", ["flow.timesteps=cosine"])


def test_interpolate_is_eq_6():
    x0, noise = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    assert interpolate(x0, noise, torch.tensor([0.0, 0.25])).flatten().tolist() == [1.0, 0.75]
