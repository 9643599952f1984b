"""Shards: writing, reading, mixing, determinism and resume, corrupt samples, the CLI."""

import io
import itertools
import random
import tarfile
from pathlib import Path

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
    # A limit of 0 (`--max-images 0`) used to give an empty result without a word: now an error.
    with pytest.raises(ValueError, match=r"--max-images\) must be >= 1, or None for all, got 0"):
        list(batched(range(5), 2, limit=0))


# ------------------------------------------------------------------ used folders, damaged data (issue 16)

def _image_folder(path, n, size=(24, 24)):
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (10 * i, 0, 0)).save(path / f"{i:03d}.png")
    return path


def _count(out):
    return sum(1 for _ in read_once(expand_shards(str(out / "*.tar")), 16))


def test_make_shards_refuses_a_used_folder_and_overwrite_replaces_it(tmp_path, caplog):
    out = tmp_path / "shards"
    assert make_shards_main(["--images", str(_image_folder(tmp_path / "many", 20)), "--out", str(out),
                             "--per-shard", "4"]) == 0
    few = _image_folder(tmp_path / "few", 12)
    # Into a used folder: refused, the old shards untouched (they used to mix: 12 images gave 20 samples).
    assert make_shards_main(["--images", str(few), "--out", str(out), "--per-shard", "4"]) == 2
    assert "is not empty" in caplog.text and "--overwrite" in caplog.text and _count(out) == 20
    assert make_shards_main(["--images", str(few), "--out", str(out), "--per-shard", "4", "--overwrite"]) == 0
    assert _count(out) == 12 and sorted(p.name for p in tmp_path.iterdir()) == ["few", "many", "shards"]
    with pytest.raises(FileExistsError, match="already holds 3 shard"):
        write_shards(_samples(2), out)


def test_make_shards_skips_a_corrupt_image_and_leaves_nothing_half_written(tmp_path, caplog):
    caplog.set_level("INFO", "muse.data")
    images = _image_folder(tmp_path / "images", 3)
    (images / "001.png").write_bytes(b"not a png at all")
    assert make_shards_main(["--images", str(images), "--out", str(tmp_path / "shards")]) == 0
    assert "001.png" in caplog.text and "1 unreadable image(s) skipped" in caplog.text
    assert _count(tmp_path / "shards") == 2
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert make_shards_main(["--images", str(broken), "--out", str(tmp_path / "none")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "images", "shards"]  # no empty shard left


def test_negative_class_labels_are_refused(tmp_path, caplog):
    images = _image_folder(tmp_path / "images", 2)
    (tmp_path / "labels.tsv").write_text("000.png\t3\n001.png\t-1\n")
    assert make_shards_main(["--images", str(images), "--labels", str(tmp_path / "labels.tsv"),
                             "--out", str(tmp_path / "shards")]) == 2
    assert "labels.tsv:2: class index must be >= 0, got '-1'" in caplog.text
    with pytest.raises(ValueError, match="class index must be >= 0, got -2"):
        write_shards([{"image": np.zeros((8, 8, 3), np.uint8), "caption": "", "cls": -2}], tmp_path / "x")


def _tar(path, records):
    """A shard from {key: {suffix: bytes}}."""
    with tarfile.open(path, "w") as tar:
        for key, files in records.items():
            for suffix, data in files.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _encoded(format="JPEG", color=(200, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, format=format)
    return buf.getvalue()


def test_a_source_with_no_decodable_sample_stops_naming_the_shard(tmp_path):
    from tests.helpers import run_within

    shard = _tar(tmp_path / "garbage-000000.tar", {f"{i:03d}": {"jpg": b"not a jpeg", "txt": b"x"} for i in range(2)})
    stream = ShardStream([Source([shard])], 16, seed=0)
    # It used to skip forever (2.5 M "skipped" lines in 5 minutes).
    with pytest.raises(ValueError, match="1000 samples in a row could not be decoded .*garbage-000000.tar"):
        run_within(20, _take, stream, 1)


def test_an_empty_tar_stops_the_source_with_its_name(tmp_path):
    from tests.helpers import run_within

    # A tar archive without members: what a failed muse-make-shards used to leave. It used to hang.
    stream = ShardStream([Source([_tar(tmp_path / "empty-000000.tar", {})])], 16, seed=0)
    with pytest.raises(ValueError, match=r"data source 0 has nothing to read: .*empty-000000.tar"):
        run_within(20, _take, stream, 1)


def test_empty_truncated_and_garbage_tars_are_skipped_with_a_warning_and_counted(tmp_path, caplog):
    from tests.helpers import run_within

    good = _tar(tmp_path / "good.tar", {f"{i:03d}": {"jpg": _encoded(), "txt": f"good {i}".encode()} for i in range(3)})
    whole = Path(_tar(tmp_path / "t.tar", {f"{i:03d}": {"jpg": _encoded(color=(0, 9 * i, 0)),
                                                        "txt": f"cut {i}".encode()} for i in range(4)})).read_bytes()
    # Cut inside the third record's image: the first two records are whole and still read.
    cut = whole.find(b"002.jpg") + 512 + 100
    (tmp_path / "truncated.tar").write_bytes(whole[:cut])
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file" * 50)
    (tmp_path / "empty.tar").write_bytes(b"")
    shards = [good] + [str(tmp_path / n) for n in ("truncated.tar", "garbage.tar", "empty.tar")]
    got = run_within(20, _take, ShardStream([Source(shards)], 16, seed=0), 10)
    assert {s["caption"] for s in got} == {"good 0", "good 1", "good 2", "cut 0", "cut 1"}
    for name in ("truncated.tar", "garbage.tar", "empty.tar"):
        assert f"shard {tmp_path / name} cannot be read" in caplog.text
    assert collate(got)["positions"][0]["bad_shards"] == 3
    # Evaluation's single pass skips them too.
    assert sorted(s["caption"] for s in read_once(shards, 16)) == ["cut 0", "cut 1", "good 0", "good 1", "good 2"]


# ------------------------------------------------------------------ the official data pipeline (issue 14)

def test_every_image_key_and_caption_key_is_read(tmp_path):
    shard = _tar(tmp_path / "keys.tar", {
        "000": {"jpg": _encoded("JPEG"), "txt": b"from txt"},
        "001": {"png": _encoded("PNG"), "text": b"from text"},
        "002": {"jpeg": _encoded("JPEG"), "caption": b"from caption"},
        "003": {"webp": _encoded("WEBP"), "json": b'{"caption": "from json caption"}'},
        "004": {"jpg": _encoded("JPEG"), "json": b'{"text": "from json text", "width": 20}'},
    })
    got = {s["key"]: s["caption"] for s in read_once([shard], 16)}
    assert got == {"000": "from txt", "001": "from text", "002": "from caption", "003": "from json caption",
                   "004": "from json text"}


def test_a_json_with_long_and_short_captions_feeds_either_source(tmp_path):
    meta = b'{"short_caption": "a cat", "long_caption": "a tabby cat asleep on a red sofa by the window"}'
    shard = _tar(tmp_path / "both.tar", {"000": {"jpg": _encoded(), "json": meta, "txt": b"alt text"}})
    long_source, short_source = Source([shard], json_caption_fields=("long_caption",)), \
        Source([shard], json_caption_fields=("short_caption", "caption"))
    assert _take(ShardStream([long_source], 16), 1)[0]["caption"].startswith("a tabby cat asleep")
    assert _take(ShardStream([short_source], 16), 1)[0]["caption"] == "a cat"
    assert _take(ShardStream([Source([shard])], 16), 1)[0]["caption"] == "alt text"  # official order: txt first


def _captioned_shards(root, n, per_shard):
    return write_shards(({"image": np.full((20, 20, 3), i, np.uint8), "caption": f"{root.name} {i}"}
                         for i in range(n)), root, samples_per_shard=per_shard)


def test_shuffle_buffer_changes_the_order_deterministically_and_resumes_exactly(tmp_path):
    shards = _captioned_shards(tmp_path / "s", 40, 10)

    def stream(seed=3, **kw):
        return ShardStream([Source(shards)], 16, seed=seed, shuffle_size=16, shuffle_initial=8, **kw)

    plain = [s["caption"] for s in _take(ShardStream([Source(shards)], 16, seed=3), 40)]
    first = _take(stream(), 60)
    order = [s["caption"] for s in first]
    assert order[:40] != plain and sorted(order[:8]) != sorted(plain[:8])  # not the file order
    assert order == [s["caption"] for s in _take(stream(), 60)]
    assert order != [s["caption"] for s in _take(stream(seed=4), 60)]
    resumed = _take(stream(resume_positions=collate(first[:23])["positions"]), 37)
    assert all(a["caption"] == b["caption"] and torch.equal(a["image"], b["image"]) for a, b in zip(first[23:], resumed))


def test_shuffle_buffer_is_webdatasets_rule():
    from muse.data import shuffle_buffer

    assert list(shuffle_buffer(range(10), 0, 0, random.Random(0))) == list(range(10))
    out = list(shuffle_buffer(range(1000), 50, 10, random.Random(0)))
    assert sorted(out) == list(range(1000)) and out != list(range(1000))
    # When item i enters, at most `size` items are buffered: at least i + 1 - size have left before it.
    assert min(out.index(i) - i for i in range(1000)) >= -50
    assert min(out.index(i) - i for i in range(1000)) < -25  # and the buffer does fill up
    # The first item out is drawn from the first `initial` items (buffer grown by 2 per item out).
    assert all(list(shuffle_buffer(range(100), 50, 10, random.Random(s)))[0] < 10 for s in range(20))


def test_each_batch_comes_from_one_source_chosen_by_ratio(tmp_path):
    sources = [Source(_captioned_shards(tmp_path / name, 8, 8), ratio)
               for name, ratio in (("short", 0.2), ("long", 0.6), ("journey", 0.2))]
    samples = _take(ShardStream(sources, 16, seed=0, batch_size=4), 4 * 400)
    batches = [collate(samples[i:i + 4]) for i in range(0, len(samples), 4)]
    origin = []
    for batch in batches:
        names = {c.split()[0] for c in batch["captions"]}
        assert len(names) == 1, names  # never mixed inside a batch
        origin.append(names.pop())
    shares = {name: origin.count(name) / len(origin) for name in ("short", "long", "journey")}
    assert abs(shares["long"] - 0.6) < 0.08 and abs(shares["short"] - 0.2) < 0.06, shares
    # A resumed stream continues the same choices.
    resumed = _take(ShardStream(sources, 16, seed=0, batch_size=4,
                                resume_positions=collate(samples[:40])["positions"]), 40)
    assert [s["caption"] for s in resumed] == [s["caption"] for s in samples[40:80]]
