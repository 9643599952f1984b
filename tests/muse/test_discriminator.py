"""The official discriminator: 16×16 logits for 224² input, its parameter count and state-dict names
(built here from the official layer description), an official loss-module checkpoint loads, and the
forward equals a functional computation with the official "same" paddings."""

import math

import pytest
import torch
import torch.nn.functional as F

from muse.losses import LeCam
from muse.models.discriminator import NLayerDiscriminator, load_official_discriminator

# Official NLayerDiscriminator(3, hidden 128, 3 stages, blur (1, 3, 3, 1)): block_in = [Conv5×5 3→128,
# LeakyReLU]; blocks.i = [Conv3×3, Blur (buffer "kernel", 1×1×4×4), GroupNorm(32), LeakyReLU] with
# widths 128→128→256→512; to_logits = [Conv1×1 512→512, LeakyReLU, Conv5×5 512→1].
WIDTHS = [(128, 128), (128, 256), (256, 512)]


def official_shapes() -> dict[str, tuple]:
    shapes = {"block_in.0.weight": (128, 3, 5, 5), "block_in.0.bias": (128,)}
    for i, (cin, cout) in enumerate(WIDTHS):
        shapes |= {f"blocks.{i}.0.weight": (cout, cin, 3, 3), f"blocks.{i}.0.bias": (cout,),
                   f"blocks.{i}.1.kernel": (1, 1, 4, 4), f"blocks.{i}.2.weight": (cout,), f"blocks.{i}.2.bias": (cout,)}
    return shapes | {"to_logits.0.weight": (512, 512, 1, 1), "to_logits.0.bias": (512,),
                     "to_logits.2.weight": (1, 512, 5, 5), "to_logits.2.bias": (1,)}


def test_names_shapes_and_parameter_count_are_official():
    disc = NLayerDiscriminator()
    assert {k: tuple(v.shape) for k, v in disc.state_dict().items()} == official_shapes()
    count = (3 * 25 + 1) * 128 + sum((cin * 9 + 1) * cout + 2 * cout for cin, cout in WIDTHS) \
        + (512 + 1) * 512 + (512 * 25 + 1)
    assert sum(p.numel() for p in disc.parameters()) == count == 1_909_889
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    torch.testing.assert_close(disc.blocks[0][1].kernel[0, 0], torch.outer(taps, taps) / 64)


def test_224_input_gives_16x16_logits():
    disc = NLayerDiscriminator()
    with torch.no_grad():
        assert disc(torch.rand(1, 3, 224, 224)).shape == (1, 1, 16, 16)
        assert disc(torch.rand(2, 3, 32, 32)).shape == (2, 1, 16, 16)  # max-pool up from 4×4


def _same_pad(x, kernel, stride):
    """TensorFlow "same" padding as the official Conv2dSame / BlurBlock compute it."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def _functional(state, x):
    def conv(t, key, k):
        return F.conv2d(_same_pad(t, k, 1), state[f"{key}.weight"], state[f"{key}.bias"])

    x = F.leaky_relu(conv(x, "block_in.0", 5), 0.1)
    for i, (_, cout) in enumerate(WIDTHS):
        x = conv(x, f"blocks.{i}.0", 3)
        blur = state[f"blocks.{i}.1.kernel"].expand(cout, -1, -1, -1)
        x = F.conv2d(_same_pad(x, 4, 2), blur, stride=2, groups=cout)
        x = F.leaky_relu(F.group_norm(x, 32, state[f"blocks.{i}.2.weight"], state[f"blocks.{i}.2.bias"]), 0.1)
    x = F.adaptive_max_pool2d(x, (16, 16))
    return conv(F.leaky_relu(conv(x, "to_logits.0", 1), 0.1), "to_logits.2", 5)


def test_forward_equals_the_official_layers_on_odd_sizes():
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    with torch.no_grad():
        for p in disc.parameters():  # non-trivial norm affines
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(2, 3, 37, 45)  # odd sizes: the blur's extra padding goes bottom/right
    torch.testing.assert_close(disc(x), _functional(disc.state_dict(), x), rtol=1e-4, atol=1e-5)


def test_an_official_loss_module_checkpoint_loads(tmp_path):
    torch.manual_seed(1)
    shapes = official_shapes()
    official = {f"discriminator.{k}": torch.randn(v) for k, v in shapes.items()}
    official |= {"ema_real_logits_mean": torch.tensor([0.25]), "ema_fake_logits_mean": torch.tensor([-0.5]),
                 "perceptual_loss.lpips.lin0.model.1.weight": torch.ones(1, 64, 1, 1)}
    torch.save(official, tmp_path / "pytorch_model_1.bin")
    disc, lecam = NLayerDiscriminator(), LeCam()
    load_official_discriminator(tmp_path / "pytorch_model_1.bin", disc, lecam)
    for key, value in disc.state_dict().items():
        assert torch.equal(value, official[f"discriminator.{key}"]), key
    assert lecam.ema_real_logits_mean.item() == 0.25 and lecam.ema_fake_logits_mean.item() == -0.5
    # A bare discriminator state dict loads too; a different size is refused with the reason.
    torch.save(NLayerDiscriminator().state_dict(), tmp_path / "bare.pt")
    load_official_discriminator(tmp_path / "bare.pt", disc)
    with pytest.raises(ValueError, match="does not hold this discriminator"):
        load_official_discriminator(tmp_path / "bare.pt", NLayerDiscriminator(hidden_channels=64))
    with pytest.raises(FileNotFoundError, match="loss.disc_init"):
        load_official_discriminator(tmp_path / "missing.bin", disc)


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="multiple of 32"):
        NLayerDiscriminator(hidden_channels=48)
    with pytest.raises(ValueError, match="blur kernel_size must be one of"):
        NLayerDiscriminator(blur_kernel_size=6)
