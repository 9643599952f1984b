"""muse.losses: each term against a direct computation on hand-made inputs, the weighted total, the
discriminator side (hinge, LeCam as official)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from muse.config import LossWeights
from muse.losses import LeCam, MuseLoss, hinge_d_loss, hinge_g_loss, reconstruction_loss, to_unit_range


class Recorder(nn.Module):
    """A stand-in discriminator/perceptual net that records what it is fed."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.seen = []

    def forward(self, x, y=None):
        self.seen.append(x.detach().clone())
        out = self.scale * x.mean((1, 2, 3), keepdim=True)
        return out if y is None else (out - self.scale * y.mean((1, 2, 3), keepdim=True)).abs().mean()


def _images(seed, n=2, size=8):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_reconstruction_loss_maps_to_unit_range_and_clamps_like_the_official_code():
    target = torch.zeros(1, 3, 4, 4)
    assert reconstruction_loss(target + 0.2, target, "l2").item() == pytest.approx(0.01)
    assert reconstruction_loss(target + 0.2, target, "l1").item() == pytest.approx(0.1)
    # The raw decoder output (no tanh) beyond [-1, 1] is clamped: 3.0 counts as 1.0, -5.0 as -1.0.
    recon = torch.tensor([3.0, -5.0, 0.5]).view(1, 3, 1, 1).requires_grad_()
    value = reconstruction_loss(recon, torch.zeros(1, 3, 1, 1), "l2")
    assert value.item() == pytest.approx((0.5 ** 2 + 0.5 ** 2 + 0.25 ** 2) / 3)
    value.backward()
    assert recon.grad[0, :2].abs().sum() == 0 and recon.grad[0, 2].item() == pytest.approx(2 * 0.25 * 0.5 / 3)
    with pytest.raises(ValueError, match="kind must be"):
        reconstruction_loss(target, target, "huber")


def test_hinge_losses_on_fixed_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, 0.5, 2] (mean 5/6); relu(1 + fake) = [0, 1, 2.5] (mean 7/6).
    assert hinge_d_loss(real, fake).item() == pytest.approx((5 / 6 + 7 / 6) / 2)
    assert hinge_g_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)


def test_lecam_uses_batch_means_and_emas_starting_at_zero():
    lecam = LeCam(decay=0.999)
    assert lecam.ema_real_logits_mean.tolist() == [0.0] and lecam.ema_fake_logits_mean.tolist() == [0.0]
    real = torch.tensor([[3.0, -1.0], [2.0, 0.0]])  # mean 1.0
    fake = torch.tensor([[-4.0, 1.0], [0.5, 0.5]])  # mean -0.5
    # First step, EMAs 0: relu(1.0 - 0)² + relu(0 - (-0.5))² = 1.25. Per element it would differ:
    # mean(relu(real)²) + mean(relu(-fake)²) = (9 + 4)/4 + 16/4 = 7.25.
    assert lecam(real, fake).item() == pytest.approx(1.25)
    lecam.update(real, fake)
    assert lecam.ema_real_logits_mean.item() == pytest.approx(0.001 * 1.0)
    assert lecam.ema_fake_logits_mean.item() == pytest.approx(0.001 * -0.5)
    # Second step against the updated EMAs, then a second update.
    real2, fake2 = torch.full((2, 2), 0.5), torch.full((2, 2), 0.25)
    expected = max(0.5 - (-0.0005), 0) ** 2 + max(0.001 - 0.25, 0) ** 2
    assert lecam(real2, fake2).item() == pytest.approx(expected)
    lecam.update(real2, fake2)
    assert lecam.ema_real_logits_mean.item() == pytest.approx(0.999 * 0.001 + 0.001 * 0.5)
    assert set(lecam.state_dict()) == {"ema_real_logits_mean", "ema_fake_logits_mean"}
    with pytest.raises(ValueError, match="lecam decay must be in"):
        LeCam(decay=1.0)


def _output(recon, topo=0.3, itc=0.7):
    return SimpleNamespace(reconstruction=recon, loss_topo=torch.tensor(topo), loss_itc=torch.tensor(itc),
                           image_embeds=None, logit_scale=None)


def test_weighted_total_terms_and_unit_range_inputs():
    target = _images(4)
    recon = (target * 1.5).requires_grad_()  # partly out of [-1, 1]: the official clamp applies
    perceptual, disc = Recorder(), Recorder()
    weights = LossWeights(reconstruction=1.0, perceptual=2.0, topology=0.2, itc=0.1, gan=0.5, lecam=0.001)
    loss = MuseLoss(weights, perceptual=perceptual, discriminator=disc)
    total, terms = loss(_output(recon), target, text_embeds=torch.randn(2, 16))
    assert set(terms) == {"reconstruction", "perceptual", "topology", "itc", "gan", "total"}
    unit_recon, unit_target = ((recon.detach() + 1) / 2).clamp(0, 1), ((target + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(terms["reconstruction"], (unit_recon - unit_target).pow(2).mean())
    torch.testing.assert_close(terms["gan"], -(2.0 * unit_recon.mean((1, 2, 3))).mean())
    expected = (1.0 * terms["reconstruction"] + 2.0 * terms["perceptual"] + 0.2 * 0.3 + 0.1 * 0.7
                + 0.5 * terms["gan"])
    torch.testing.assert_close(total.detach(), expected)
    for seen in perceptual.seen + disc.seen:
        assert seen.min() >= 0 and seen.max() <= 1
    torch.testing.assert_close(perceptual.seen[0], unit_recon)
    total.backward()
    assert recon.grad.abs().sum() > 0
    # The generator's pass leaves the discriminator without gradients, and trainable afterwards.
    assert disc.scale.grad is None and disc.scale.requires_grad
    # Without the adversarial phase (before loss.disc_start) there is no GAN term.
    assert "gan" not in loss(_output(recon), target, torch.randn(2, 16), adversarial=False)[1]


def test_discriminator_loss_is_hinge_plus_weighted_lecam_against_the_previous_emas():
    target, recon = _images(5), _images(6)
    disc = Recorder()
    weights = LossWeights(perceptual=0.0, gan=0.5, lecam=0.001)
    loss = MuseLoss(weights, discriminator=disc, disc_factor=1.0)
    d_loss, d_terms = loss.discriminator_loss(recon, target)
    real = 2.0 * to_unit_range(target).mean((1, 2, 3), keepdim=True)
    fake = 2.0 * to_unit_range(recon).mean((1, 2, 3), keepdim=True)
    hinge = (F.relu(1 - real).mean() + F.relu(1 + fake).mean()) / 2
    lecam = F.relu(real.mean()) ** 2 + F.relu(-fake.mean()) ** 2  # EMAs were 0
    torch.testing.assert_close(d_loss.detach(), hinge + 0.001 * lecam)
    assert set(d_terms) == {"d_hinge", "d_lecam", "d_logits_real", "d_logits_fake", "d_total"}
    assert loss.lecam.ema_real_logits_mean.item() == pytest.approx(0.001 * real.mean().item())
    d_loss.backward()
    assert disc.scale.grad is not None
    # disc_factor scales the whole discriminator loss and the generator's GAN term (official).
    halved = MuseLoss(weights, discriminator=disc, disc_factor=0.5)
    torch.testing.assert_close(halved.discriminator_loss(recon, target)[0].detach(), 0.5 * (hinge + 0.001 * lecam))


def test_terms_run_in_fp32_under_autocast():
    disc = Recorder()
    loss = MuseLoss(LossWeights(perceptual=0.0, gan=0.5, topology=0.0), discriminator=disc)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = loss(_output(_images(1).bfloat16()), _images(2).bfloat16())
        loss.discriminator_loss(_images(1).bfloat16(), _images(2).bfloat16())
    assert total.dtype == torch.float32 and all(seen.dtype == torch.float32 for seen in disc.seen)


def test_missing_pieces_raise():
    with pytest.raises(ValueError, match="needs a perceptual loss module"):
        MuseLoss(LossWeights(perceptual=1.0))
    with pytest.raises(ValueError, match="needs a discriminator"):
        MuseLoss(LossWeights(perceptual=0.0, gan=0.5))
    loss = MuseLoss(LossWeights(perceptual=0.0, itc=0.1))
    output = SimpleNamespace(reconstruction=_images(1), loss_topo=torch.tensor(0.1), loss_itc=None)
    with pytest.raises(ValueError, match="needs text_embeds"):
        loss(output, _images(1))
