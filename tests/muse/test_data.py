"""Shards: writing, reading, mixing, determinism and resume, corrupt samples, the CLI."""

import io
import itertools
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from muse.data import (ShardStream, Source, collate, expand_shards, make_shards_main, read_captions, read_once,
                       write_shards)


def _samples(n, color_offset=0):
    rng = np.random.default_rng(color_offset)
    for i in range(n):
        yield {"image": rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8), "caption": f"photo {i}", "cls": i % 3}


def _take(stream, n):
    return list(itertools.islice(iter(stream), n))


def test_write_and_read_back(tmp_path):
    shards = write_shards(_samples(7), tmp_path, samples_per_shard=3)
    assert len(shards) == 3
    got = _take(ShardStream([Source(shards)], image_size=32, seed=1), 7)
    assert {s["caption"] for s in got} == {f"photo {i}" for i in range(7)}
    for s in got:
        assert s["image"].shape == (3, 32, 32) and -1 <= s["image"].min() and s["image"].max() <= 1
    batch = collate(got[:4])
    assert batch["images"].shape == (4, 3, 32, 32) and batch["cls"].tolist() == [s["cls"] for s in got[:4]]


def test_stream_is_deterministic_and_resumes_exactly(tmp_path):
    shards = write_shards(_samples(10), tmp_path, samples_per_shard=4)
    first = _take(ShardStream([Source(shards)], 24, seed=3), 25)
    again = _take(ShardStream([Source(shards)], 24, seed=3), 25)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    consumed = collate(first[:12])["positions"]
    resumed = _take(ShardStream([Source(shards)], 24, seed=3, resume_positions=consumed), 13)
    assert all(torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
               for a, b in zip(first[12:], resumed))
    other = _take(ShardStream([Source(shards)], 24, seed=4), 25)
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(first, other))


def test_sources_are_mixed_by_ratio(tmp_path):
    a = write_shards(({"image": np.zeros((32, 32, 3), np.uint8), "caption": "a"} for _ in range(4)), tmp_path / "a")
    b = write_shards(({"image": np.zeros((32, 32, 3), np.uint8), "caption": "b"} for _ in range(4)), tmp_path / "b")
    got = _take(ShardStream([Source(a, 0.8), Source(b, 0.2)], 16, seed=0), 400)
    share = sum(s["caption"] == "a" for s in got) / len(got)
    assert 0.7 < share < 0.9


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    path = tmp_path / "bad-000000.tar"
    with tarfile.open(path, "w") as tar:
        for i, payload in enumerate([None, b"not a jpeg", None, b"\xff\xd8\xff broken"]):
            if payload is None:
                buf = io.BytesIO()
                Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(buf, format="JPEG")
                payload = buf.getvalue()
            for suffix, data in (("jpg", payload), ("txt", f"sample {i}".encode())):
                info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stream = ShardStream([Source([str(path)])], 16, seed=0)
    got = _take(stream, 4)
    assert {s["caption"] for s in got} == {"sample 0", "sample 2"}
    assert stream.skipped >= 2


def test_missing_shards_and_bad_captions_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    (tmp_path / "caps.tsv").write_text("a.jpg\tfine\nno tab here\n")
    with pytest.raises(ValueError, match="caps.tsv:2"):
        read_captions(tmp_path / "caps.tsv")


def test_make_shards_cli(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (30, 30), (i * 60, 10, 10)).save(images / f"{i}.png")
    (tmp_path / "caps.tsv").write_text("0.png\tred-ish\n1.png\tdarker\n")
    assert make_shards_main(["--images", str(images), "--captions", str(tmp_path / "caps.tsv"),
                             "--out", str(tmp_path / "shards"), "--per-shard", "2"]) == 0
    shards = expand_shards(str(tmp_path / "shards" / "*.tar"))
    assert len(shards) == 2
    captions = {s["caption"] for s in _take(ShardStream([Source(shards)], 16, seed=0), 3)}
    assert captions == {"red-ish", "darker", ""}


def test_make_shards_cli_with_class_folders_labels_and_label_maps(tmp_path):
    root = tmp_path / "imagenet_like"
    segs = tmp_path / "annotations"
    segs.mkdir()
    for cls, name in enumerate(("n001_cat", "n002_dog")):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 32), (100 * cls, 50, 50)).save(root / name / f"{name}_{i}.jpg")
            labels = np.full((32, 40), 3 * cls + i, dtype=np.uint8)
            Image.fromarray(labels).save(segs / f"{name}_{i}.png")
    assert make_shards_main(["--images", str(root), "--class-folders", "--seg-dir", str(segs),
                             "--out", str(tmp_path / "shards")]) == 0
    assert (tmp_path / "shards" / "classes.txt").read_text().split() == ["n001_cat", "n002_dog"]
    got = {s["key"]: s for s in read_once(expand_shards(str(tmp_path / "shards" / "*.tar")), 32)}
    assert sorted(s["cls"] for s in got.values()) == [0, 0, 1, 1]
    for sample in got.values():
        assert sample["seg"].unique().numel() == 1 and int(sample["seg"][0, 0]) // 3 == sample["cls"]
    # A labels file instead of folders; a missing label or label map is an error naming the files.
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (20, 20)).save(flat / "a.png")
    Image.new("RGB", (20, 20)).save(flat / "b.png")
    (tmp_path / "labels.tsv").write_text("a.png\t7\nb.png\t2\n")
    assert make_shards_main(["--images", str(flat), "--labels", str(tmp_path / "labels.tsv"),
                             "--out", str(tmp_path / "flat_shards")]) == 0
    assert sorted(s["cls"] for s in read_once(expand_shards(str(tmp_path / "flat_shards" / "*.tar")), 16)) == [2, 7]
    (tmp_path / "labels.tsv").write_text("a.png\t7\n")
    assert make_shards_main(["--images", str(flat), "--labels", str(tmp_path / "labels.tsv"),
                             "--out", str(tmp_path / "x")]) == 2
    assert make_shards_main(["--images", str(flat), "--seg-dir", str(segs), "--out", str(tmp_path / "y")]) == 2


def test_palette_label_maps_keep_their_indices(tmp_path):
    image, labels = _half_and_half()
    palette = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))  # colours unlike the indices
    shards = write_shards([{"image": image, "caption": "", "seg": palette}], tmp_path)
    seg = next(read_once(shards, 32))["seg"]
    assert set(seg.unique().tolist()) == {1, 2} and seg[:, :16].eq(1).all()


def test_data_loader_workers_each_read_their_own_shards(tmp_path):
    shards = write_shards(_samples(8), tmp_path, samples_per_shard=2)
    stream = ShardStream([Source(shards)], 16, seed=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2, collate_fn=collate)
    batches = list(itertools.islice(iter(loader), 8))
    captions = {c for b in batches for c in b["captions"]}
    assert captions == {f"photo {i}" for i in range(8)}
    assert {part for b in batches for part in b["positions"]} == {0, 1}


def _half_and_half(width=50, height=40):
    """Red left half labelled 1, blue right half labelled 2."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2, 0] = 255
    image[:, width // 2:, 2] = 255
    labels = np.ones((height, width), dtype=np.uint8)
    labels[:, width // 2:] = 2
    return image, labels


def test_segmentation_labels_follow_the_image_through_crop_and_flip(tmp_path):
    image, labels = _half_and_half()
    shards = write_shards(({"image": image, "caption": "", "seg": labels} for _ in range(12)), tmp_path)
    flipped = 0
    for sample in _take(ShardStream([Source(shards)], image_size=32, seed=5), 12):
        pixels, seg = sample["image"], sample["seg"]
        assert seg.shape == (32, 32) and seg.dtype == torch.int64 and set(seg.unique().tolist()) <= {1, 2}
        red = (pixels[0] > 0.5) & (pixels[2] < -0.5)
        blue = (pixels[2] > 0.5) & (pixels[0] < -0.5)
        assert red.any() and blue.any()
        assert (seg[red] == 1).all() and (seg[blue] == 2).all()
        flipped += int(seg[0, 0] == 2)  # red is on the left unless flipped
    assert 0 < flipped < 12  # both orientations occurred, so the flip reached the labels
    centre = next(read_once(shards, 32))["seg"]  # 50x40 → 40x32, crop from column 4: the edge at 16
    assert centre[:, :16].eq(1).all() and centre[:, 16:].eq(2).all()


def test_segmentation_labels_must_match_the_image(tmp_path):
    image, labels = _half_and_half()
    with pytest.raises(ValueError, match="segmentation labels are 49x40, the image 50x40"):
        write_shards([{"image": image, "caption": "", "seg": labels[:, :49]}], tmp_path)
    with pytest.raises(ValueError, match="8-bit"):
        write_shards([{"image": image, "caption": "", "seg": Image.fromarray(labels.astype(np.int32))}], tmp_path)


def test_batched_stops_at_the_limit_without_reading_further():
    from muse.data import batched

    read = []

    def samples():
        for i in range(10):
            read.append(i)
            yield i

    assert list(batched(samples(), 3, limit=7)) == [[0, 1, 2], [3, 4, 5], [6]] and read == list(range(7))
    assert list(batched(range(5), 2)) == [[0, 1], [2, 3], [4]]
    assert list(batched(range(5), 2, limit=0)) == []
