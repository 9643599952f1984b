"""linear-probe, zero-shot and seg-probe: scores on hand-computable cases, the tools end to end on tiny."""

import json

import numpy as np
import pytest
import torch

from muse.config import load_config
from muse.data import write_shards
from muse.eval.__main__ import main as muse_eval
from muse.eval.features import FeatureSet, cache_key, cached_features
from muse.eval.linear_probe import linear_probe, topk_accuracy
from muse.eval.probe import ProbeSettings
from muse.eval.seg_probe import seg_probe, segmentation_scores
from muse.eval.zero_shot import class_embeddings, imagenet_class_names, read_templates, zero_shot_scores


def _separable(n_per_class, classes=3, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:classes] * 4
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    features = centres[labels] + 0.5 * torch.randn(len(labels), dim, generator=gen)
    return FeatureSet(features, labels, None, (1, 1), [str(i) for i in range(len(labels))])


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    labels = torch.tensor([0, 2, 0, 1])  # right, second, third, third
    assert topk_accuracy(logits, labels, 1) == 0.25
    assert topk_accuracy(logits, labels, 2) == 0.5
    assert topk_accuracy(logits, labels, 5) == 1.0


def test_linear_probe_separates_separable_features():
    report, head = linear_probe(_separable(20), _separable(10, seed=1), ProbeSettings(epochs=60, batch_size=16,
                                                                                       lr=1e-2))
    assert report["top1"] == 1.0 and report["train_top1"] == 1.0 and report["classes"] == 3
    # Standardization is inside the returned head: it classifies raw features.
    val = _separable(10, seed=1)
    assert torch.equal(head(val.features).argmax(1), val.labels)


def test_linear_probe_rejects_unlabelled_samples():
    unlabelled = _separable(4)
    unlabelled.labels[2] = -1
    with pytest.raises(ValueError, match="training set: 1 of 12 samples have no .cls label"):
        linear_probe(unlabelled, _separable(4))


def test_segmentation_scores_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 255]])
    perfect = segmentation_scores(target.clamp(max=2), target, 3, ignore_index=255)
    assert perfect["miou"] == 1.0 and perfect["pixel_accuracy"] == 1.0
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    scores = segmentation_scores(pred, target, 3, ignore_index=255)
    # class 0: ∩1 ∪3 (one right, one predicted as 1, one 2 predicted as 0); class 1: ∩2 ∪3; class 2: ∩2 ∪3.
    assert scores["per_class_iou"] == pytest.approx({0: 1 / 3, 1: 2 / 3, 2: 2 / 3})
    assert scores["miou"] == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(5 / 7)
    # The ignored class is not scored even when predicted.
    assert segmentation_scores(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 1, 1]), 2, 0)["miou"] == 0.0
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        segmentation_scores(pred, target, 2, ignore_index=255)


def _segmentation_set(n, seed):
    """4×4 token grids whose features name the class of their token (left half 1, right half 2, ignore 0
    on the top row), labels at 16×16 pixels."""
    gen = torch.Generator().manual_seed(seed)
    token_labels = torch.tensor([1, 1, 2, 2]).repeat(4, 1)
    features = torch.stack([torch.eye(4)[token_labels.flatten()] * 3 + 0.3 * torch.randn(16, 4, generator=gen)
                            for _ in range(n)])
    seg = token_labels.repeat_interleave(4, 0).repeat_interleave(4, 1).repeat(n, 1, 1)
    seg[:, :2] = 0
    return FeatureSet(features, torch.full((n,), -1), seg, (4, 4), [str(i) for i in range(n)])


def test_seg_probe_learns_token_classes():
    report, _ = seg_probe(_segmentation_set(12, 0), _segmentation_set(6, 1), num_classes=3, ignore_index=0,
                          settings=ProbeSettings(epochs=80, batch_size=4, lr=3e-2))
    # Logits are upsampled bilinearly: the decision edge falls where the two classes' margins cross,
    # exactly on the token edge only when the margins are equal, so a pixel column there may flip.
    assert report["miou"] > 0.99 and report["pixel_accuracy"] > 0.99
    assert set(report["per_class_iou"]) == {1, 2}  # 0 is ignored


def test_zero_shot_scores_by_hand():
    classes = torch.eye(8)[:6]
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    images = classes[labels].clone()
    images[4] = 0.9 * classes[0] + 0.4 * classes[4]  # nearest class 0, second its own
    images[5] = 0.9 * classes[1] + 0.1 * classes[2]  # own class not in the top 2 ... but in the top 5
    scores = zero_shot_scores(images, classes, labels)
    assert scores["top1"] == pytest.approx(4 / 6) and scores["top5"] == 1.0
    with pytest.raises(ValueError, match="labels go up to 6 but there are 6 class names"):
        zero_shot_scores(images, classes, torch.tensor([0, 1, 2, 3, 4, 6]))


def test_class_embeddings_average_the_templates(tmp_path):
    table = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))

    def tokenize(texts):
        return {"input_ids": torch.tensor([[len(t) % 50] for t in texts])}

    def encode(input_ids):
        return table[input_ids[:, 0]] * 3  # not normalized: class_embeddings must normalize each prompt

    got = class_embeddings(encode, tokenize, ["cat", "zebra"], ["a {}", "the {} here"])
    for row, name in zip(got, ["cat", "zebra"]):
        prompts = torch.nn.functional.normalize(table[[len(f"a {name}"), len(f"the {name} here")]], dim=-1)
        torch.testing.assert_close(row, torch.nn.functional.normalize(prompts.mean(0), dim=0))
    with pytest.raises(ValueError, match="needs a '\\{\\}'"):
        read_templates(_write(tmp_path / "t.txt", "a photo\n"))
    assert read_templates(_write(tmp_path / "ok.txt", "a {}\n\nthe {}\n")) == ["a {}", "the {}"]


def _write(path, text):
    path.write_text(text)
    return path


def test_imagenet_class_names_from_timms_files(tmp_path):
    info = tmp_path / "data" / "_info"
    info.mkdir(parents=True)
    _write(info / "imagenet_synsets.txt", "n02\nn01\n")
    _write(info / "imagenet_synset_to_lemma.txt", "n01\ttench, Tinca tinca\nn02\tgoldfish, Carassius auratus\n")
    assert imagenet_class_names(tmp_path) == ["goldfish", "tench"]


def test_feature_cache_round_trip(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return _segmentation_set(2, 0)

    key = cache_key(config="tiny", shards=[str(_write(tmp_path / "s.tar", "x"))], kind="latents")
    first = cached_features(tmp_path / "cache", key, compute)
    second = cached_features(tmp_path / "cache", key, compute)
    assert len(calls) == 1 and torch.equal(first.features, second.features) and torch.equal(first.seg, second.seg)
    assert second.grid == (4, 4)
    _write(tmp_path / "s.tar", "changed")  # a rewritten shard is another key
    assert cache_key(config="tiny", shards=[str(tmp_path / "s.tar")], kind="latents") != key


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("probes")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        samples = []
        for i in range(count):
            labels = np.zeros((36, 40), dtype=np.uint8)
            labels[:, 20:] = 1 + i % 2
            samples.append({"image": rng.integers(0, 255, (36, 40, 3), dtype=np.uint8), "caption": f"a thing {i}",
                            "cls": i % 3, "seg": labels})
        write_shards(samples, root / split, samples_per_shard=4)
    return root


def _common(checkpoint, tool, *extra):
    return [tool, "--config", "tiny", "--checkpoint", str(checkpoint), *extra]


def test_linear_probe_tool_end_to_end_with_cache(labelled_run, tmp_path, tiny_checkpoint):
    root = labelled_run
    args = _common(tiny_checkpoint, "linear-probe", "--train-shards", str(root / "train" / "*.tar"), "--val-shards",
                   str(root / "val" / "*.tar"), "--epochs", "5", "--cache", str(tmp_path / "cache"))
    assert muse_eval([*args, "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "linear_probe.json").read_text())
    assert report["classes"] == 3 and report["train_samples"] == 8 and report["val_samples"] == 4
    assert 0 <= report["top1"] <= 1 and report["feature_dim"] == load_config("tiny").model.dim
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 2
    assert muse_eval([*args, "--out", str(tmp_path / "b")]) == 0  # from the cache: the same numbers
    again = json.loads((tmp_path / "b" / "linear_probe.json").read_text())
    assert again["top1"] == report["top1"] and again["train_top1"] == report["train_top1"]
    assert (tmp_path / "a" / "linear_probe_head.pt").exists()


def test_seg_probe_tool_end_to_end(labelled_run, tmp_path, tiny_checkpoint):
    root = labelled_run
    assert muse_eval(_common(tiny_checkpoint, "seg-probe", "--train-shards", str(root / "train" / "*.tar"), "--val-shards",
                             str(root / "val" / "*.tar"), "--epochs", "3", "--feature", "latents", "--out",
                             str(tmp_path))) == 0
    report = json.loads((tmp_path / "seg_probe.json").read_text())
    assert report["classes"] == 3 and report["ignore_index"] == 0 and 0 <= report["miou"] <= 1
    assert set(map(int, report["per_class_iou"])) <= {1, 2}


def test_zero_shot_tool_end_to_end(labelled_run, tmp_path, tiny_checkpoint):
    root = labelled_run
    classes = _write(tmp_path / "classes.txt", "red thing\ngreen thing\nblue thing\n")
    assert muse_eval(_common(tiny_checkpoint, "zero-shot", "--shards", str(root / "val" / "*.tar"), "--classes", str(classes),
                             "--out", str(tmp_path / "out"))) == 0
    report = json.loads((tmp_path / "out" / "zero_shot.json").read_text())
    assert report["images"] == 4 and report["classes"] == 3 and report["top5"] == 1.0  # 3 classes: always in top 5
    two = _write(tmp_path / "two.txt", "red\ngreen\n")  # labels go up to 2
    assert muse_eval(_common(tiny_checkpoint, "zero-shot", "--shards", str(root / "val" / "*.tar"), "--classes", str(two),
                             "--out", str(tmp_path / "x"))) == 2


def test_probe_tools_report_bad_input(labelled_run, tmp_path, tiny_checkpoint):
    root = labelled_run
    unlabelled = tmp_path / "plain"
    write_shards(({"image": np.zeros((32, 32, 3), np.uint8), "caption": ""} for _ in range(2)), unlabelled)
    args = ["--train-shards", str(unlabelled / "*.tar"), "--val-shards", str(root / "val" / "*.tar"), "--epochs", "1"]
    assert muse_eval(_common(tiny_checkpoint, "linear-probe", *args, "--out", str(tmp_path / "l"))) == 2
    assert muse_eval(_common(tiny_checkpoint, "seg-probe", *args, "--out", str(tmp_path / "s"))) == 2
    assert muse_eval(_common(tiny_checkpoint, "linear-probe", "--train-shards", str(tmp_path / "none*.tar"), "--val-shards",
                             str(root / "val" / "*.tar"), "--out", str(tmp_path / "n"))) == 2
    assert not (tmp_path / "l").exists() and not (tmp_path / "s").exists()
