"""The protocols' image pipelines against torchvision's arithmetic worked out by hand, 8-bit rounding and
the official evaluator's float round trips, shard reading."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from muse.eval.transforms import (ADE_IGNORE, center_crop, make_pipeline, official_inception_levels, read_raw,
                                  reduce_zero_label, resize_crop, resize_shorter_edge, round_to_8bit, stretch_pair)


def test_resize_truncates_the_long_edge_and_crop_rounds_half_to_even():
    # torchvision Resize(256): 333x250 → short 256, long int(256·333/250) = int(340.99) = 340 (not 341).
    assert resize_shorter_edge(Image.new("RGB", (333, 250)), 256).size == (340, 256)
    assert resize_shorter_edge(Image.new("RGB", (250, 333)), 256).size == (256, 340)
    assert resize_shorter_edge(Image.new("RGB", (256, 300)), 256).size == (256, 300)  # already there
    # CenterCrop(224) of 257 rows: (257 − 224) / 2 = 16.5 → round half to even → 16 rows above.
    rows = np.repeat(np.arange(257, dtype=np.uint8)[:, None], 230, axis=1)
    cropped = np.asarray(center_crop(Image.fromarray(rows), 224))
    assert cropped.shape == (224, 224) and cropped[0, 0] == 16 and cropped[-1, 0] == 239
    # (230 − 224) / 2 = 3 columns on the left.
    columns = np.repeat(np.arange(230, dtype=np.uint8)[None, :], 257, axis=0)
    assert np.asarray(center_crop(Image.fromarray(columns), 224))[0, 0] == 3
    with pytest.raises(ValueError, match="cannot centre-crop 224x224 out of a 200x300 image"):
        center_crop(Image.new("RGB", (200, 300)), 224)


def test_resize_crop_gives_pixels_in_minus_one_one():
    image = Image.new("RGB", (300, 260), (255, 0, 128))
    pixels = resize_crop(image, 256, 224)
    assert pixels.shape == (3, 224, 224)
    torch.testing.assert_close(pixels[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]))


def test_ade_labels_shift_and_nearest_stretch():
    labels = torch.tensor([[0, 1, 150, 255]], dtype=torch.uint8)
    assert reduce_zero_label(labels).tolist() == [[ADE_IGNORE, 0, 149, ADE_IGNORE]]
    # 2x4 labels stretched to 4x4: nearest picks source row ⌊i/2⌋, column i.
    raw = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.uint8)
    pixels, seg = stretch_pair(Image.new("RGB", (4, 2)), Image.fromarray(raw), 4)
    assert pixels.shape == (3, 4, 4) and seg.dtype == torch.uint8
    assert seg.tolist() == [[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8], [5, 6, 7, 8]]
    shifted = make_pipeline("stretch", 32, crop=4, labels="reduce_zero")
    assert shifted(Image.new("RGB", (4, 2)), Image.fromarray(raw))[1][0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="pipeline must be"):
        make_pipeline("squash", 32)


def test_round_to_8bit_rounds_to_nearest_and_clamps():
    values = torch.tensor([-1.5, -1.0, -1 + 0.49 / 127.5, -1 + 0.51 / 127.5, 0.0, 1.0, 2.0])
    assert round_to_8bit(values).tolist() == [0, 0, 0, 1, 128, 255, 255]  # 127.5 rounds half to even: 128


def test_official_inception_levels_repeat_the_official_float_round_trips():
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    fake = official_inception_levels(levels, "reconstruction")
    # By hand: level 1 is (1 − 127.5) / 127.5 = −0.99215686 in float32; (x + 1) / 2 · 255 = 0.99999994 → 0.
    assert fake[0, 0, 0, 1] == 0 and fake[0, 0, 0, 0] == 0 and fake[0, 0, 0, 255] == 255
    # The same arithmetic in numpy float32, written independently.
    k = np.arange(256, dtype=np.float32)
    expected_fake = (((k - np.float32(127.5)) / np.float32(127.5) + np.float32(1)) / np.float32(2) * np.float32(255))
    assert fake[0, 0, 0].numpy().tolist() == expected_fake.astype(np.uint8).tolist()
    real = official_inception_levels(levels, "real")
    for channel, (mean, std) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        m, s = np.float32(mean), np.float32(std)
        expected = (((k / np.float32(255) - m) / s) * s + m) * np.float32(255)
        assert real[0, channel, 0].numpy().tolist() == expected.astype(np.uint8).tolist()
    # Truncation only ever lowers a level, by one at most, and it does lower some.
    for got in (fake, real):
        drop = levels.long() - got.long()
        assert drop.min() >= 0 and drop.max() == 1
    with pytest.raises(ValueError, match="source must be"):
        official_inception_levels(levels, "other")


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_read_raw_takes_png_images_and_skips_bad_samples(tmp_path, caplog):
    image = np.full((6, 8, 3), 200, np.uint8)
    _tar(tmp_path / "s.tar", [("a.png", _png(image)), ("a.cls", b"0"), ("a.seg.png", _png(np.ones((6, 8), np.uint8))),
                              ("b.txt", b"no image"), ("c.jpg", b"not a jpeg"), ("d.png", _png(image))])
    samples = list(read_raw([str(tmp_path / "s.tar")]))
    assert [s["key"] for s in samples] == ["a", "d"]
    assert samples[0]["cls"] == 0 and samples[0]["seg"].size == (8, 6) and samples[0]["image"].size == (8, 6)
    assert samples[1]["cls"] == -1 and samples[1]["seg"] is None
    assert "no image" in caplog.text and "undecodable" in caplog.text
