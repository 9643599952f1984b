"""What the tokenizer is handed: images in [-1, 1] as floats, the model section of a config."""

import pytest
import torch

from muse.config import load_config
from muse.models.inputs import check_images, check_model_config


def test_images_in_range_pass():
    check_images(torch.rand(2, 3, 32, 32) * 2 - 1, expected_size=32)
    check_images(torch.full((1, 3, 8, 16), 1.05, dtype=torch.bfloat16), expected_size=(8, 16))  # resampling overshoot


@pytest.mark.parametrize("images,error,message", [
    (torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), TypeError,
     r"images must be floating point with values in \[-1, 1\], got torch.uint8; convert 8-bit images with "
     r"images.float\(\) / 127.5 - 1"),
    (torch.randint(0, 256, (2, 3, 32, 32)).float(), ValueError,
     r"images must have values in \[-1, 1\], got values from 0 to 255 \(0..255 pixel values\? use images / 127.5 - 1\)"),
    (torch.full((1, 3, 32, 32), -3.0), ValueError, r"got values from -3 to -3 \(scale them to \[-1, 1\]\)"),
    (torch.full((1, 3, 32, 32), float("nan")), ValueError, "images holds NaN or infinite values"),
    (torch.zeros(2, 32, 32, 3), ValueError, r"images must be \(batch, 3, height, width\), got shape \(2, 32, 32, 3\)"),
    (torch.zeros(2, 3, 24, 32), ValueError, r"images must be 32x32 \(height x width\), got 24x32"),
])
def test_bad_images_are_refused_with_what_to_do(images, error, message):
    with pytest.raises(error, match=message):
        check_images(images, expected_size=32)


def test_the_whole_config_instead_of_its_model_section_is_named():
    cfg = load_config("tiny")
    check_model_config(cfg.model)
    with pytest.raises(TypeError, match=r"MuseTokenizer\(cfg.model\), not the whole Config"):
        check_model_config(cfg)
    with pytest.raises(TypeError, match="takes a ModelConfig .* got dict"):
        check_model_config({"dim": 64})
