"""linear-probe, zero-shot and seg-probe: each protocol's pieces against hand-computed values, the tools
end to end on tiny under both protocols, deterministic from run to run."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from muse.config import load_config
from muse.data import write_shards
from muse.eval.__main__ import main as muse_eval
from muse.eval.features import FeatureSet, cache_key, cached_features
from muse.eval.linear_probe import build_classifier, linear_probe, topk_accuracy
from muse.eval.probe import L2Normalize, Standardize, evaluation_epochs, select_epoch, train_probe
from muse.eval.protocols import LINEAR_PROBE, SEG_PROBE
from muse.eval.seg_probe import TokenSegmentationHead, seg_probe, segmentation_scores
from muse.eval.zero_shot import (OPENAI_CLASSES, OPENAI_TEMPLATES, class_embeddings, class_names,
                                 imagenet_class_names, read_lines, read_templates, zero_shot_scores)

OFFICIAL_LP, FAST_LP = LINEAR_PROBE["official"], LINEAR_PROBE["fast"]


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


def test_official_linear_probe_settings_are_the_official_scripts():
    assert (OFFICIAL_LP.resize, OFFICIAL_LP.crop, OFFICIAL_LP.feature) == (256, 224, "semantic")
    assert (OFFICIAL_LP.optimizer, OFFICIAL_LP.nesterov, OFFICIAL_LP.momentum) == ("sgd", True, 0.9)
    assert OFFICIAL_LP.lr == 0.1 and OFFICIAL_LP.weight_decay == 0.0 and OFFICIAL_LP.l2_normalize
    assert (OFFICIAL_LP.probe_batch_size, OFFICIAL_LP.epochs, OFFICIAL_LP.schedule) == (4096, 100, "cosine_per_epoch")
    assert (OFFICIAL_LP.eval_every, OFFICIAL_LP.select, OFFICIAL_LP.num_classes) == (5, "best", 1000)
    seg = SEG_PROBE["official"]
    assert (seg.input_size, seg.feature, seg.head, seg.lr, seg.momentum, seg.weight_decay) == (
        512, "hidden", "bn_conv", 0.01, 0.9, 1e-4)
    assert (seg.epochs, seg.probe_batch_size, seg.miou_over, seg.num_classes, seg.select) == (10, 8, "all", 150, "best")


def test_batchnorm_head_is_affine_free_and_normalizes_by_the_batch():
    features = torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, 16.0]])
    head = build_classifier(OFFICIAL_LP, features, 2)
    norm, linear = head[1], head[2]
    assert isinstance(norm, torch.nn.BatchNorm1d) and norm.weight is None and norm.bias is None and norm.eps == 1e-6
    with torch.no_grad():
        linear.weight.copy_(torch.eye(2))
        linear.bias.zero_()
    head[0] = torch.nn.Identity()  # look at the BatchNorm alone
    head.train()
    out = head(features)
    # By hand: column 0 has mean 3, biased variance 8/3; column 1 mean 12, variance 8.
    expected = torch.stack([(features[:, 0] - 3) / math.sqrt(8 / 3 + 1e-6),
                            (features[:, 1] - 12) / math.sqrt(8 + 1e-6)], 1)
    torch.testing.assert_close(out, expected)
    # Running statistics moved 10 % towards the batch's (unbiased variance for the running one).
    torch.testing.assert_close(norm.running_mean, torch.tensor([0.3, 1.2]))
    torch.testing.assert_close(norm.running_var, torch.tensor([0.9 + 0.1 * 4.0, 0.9 + 0.1 * 12.0]))
    # The official probe L2-normalizes first, the fast one standardizes: both heads read raw pooled features.
    assert isinstance(build_classifier(OFFICIAL_LP, features, 2)[0], L2Normalize)
    assert isinstance(build_classifier(FAST_LP, features, 2)[0], Standardize)


def test_nesterov_steps_and_per_epoch_cosine_by_hand():
    settings = dataclasses.replace(OFFICIAL_LP, probe_batch_size=1, epochs=4, eval_every=1, select="final")
    # One weight w, one sample x = 1, target class 0 of 2; logits (w, 0): dL/dw = softmax(w)[0] − 1.
    head = torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        head.weight.zero_()
    inputs, targets = torch.ones(1, 1), torch.zeros(1, dtype=torch.long)
    history = train_probe(head, inputs, targets, settings, evaluate=lambda model: {"top1": 1.0}, metric="top1")
    # CosineAnnealingLR(T_max=4) stepped once per epoch: lr_e = 0.1 · (1 + cos(π e / 4)) / 2.
    assert [h["lr"] for h in history] == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])
    # Nesterov by hand (PyTorch's form): b ← μ b + g; w ← w − lr (g + μ b); the two logits' gradients are ±.
    w0, w1, buf = 0.0, 0.0, [0.0, 0.0]
    for epoch in range(4):
        lr = 0.1 * (1 + math.cos(math.pi * epoch / 4)) / 2
        p0 = 1 / (1 + math.exp(w1 - w0))
        grads = [p0 - 1, 1 - p0]
        buf = [0.9 * b + g for b, g in zip(buf, grads)]
        w0, w1 = w0 - lr * (grads[0] + 0.9 * buf[0]), w1 - lr * (grads[1] + 0.9 * buf[1])
    torch.testing.assert_close(head.weight.detach().flatten(), torch.tensor([w0, w1]))


def test_validation_epochs_and_best_versus_final():
    assert evaluation_epochs(100, 5)[:3] == [5, 10, 15] and evaluation_epochs(100, 5)[-1] == 100
    assert evaluation_epochs(12, 5) == [5, 10, 12] and evaluation_epochs(7, 0) == [7]
    history = [{"epoch": 1, "loss": 2.0}, {"epoch": 5, "top1": 0.4}, {"epoch": 10, "top1": 0.7},
               {"epoch": 15, "top1": 0.7}, {"epoch": 20, "top1": 0.6}]
    assert select_epoch(history, "top1", "best")["epoch"] == 10  # the first to reach the highest, as `acc > best`
    assert select_epoch(history, "top1", "final") == {"epoch": 20, "top1": 0.6}
    with pytest.raises(ValueError, match="select must be best or final"):
        select_epoch(history, "top1", "median")


def test_best_epoch_head_is_the_one_kept():
    scores = iter([0.2, 0.9, 0.5])
    settings = dataclasses.replace(OFFICIAL_LP, probe_batch_size=2, epochs=3, eval_every=1)
    head = torch.nn.Linear(2, 2)
    seen = []

    def evaluate(model):
        seen.append(model.weight.detach().clone())
        return {"top1": next(scores)}

    train_probe(head, torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), settings, evaluate, metric="top1")
    torch.testing.assert_close(head.weight.detach(), seen[1])  # epoch 2 scored best
    assert not torch.equal(seen[1], seen[2])


@pytest.mark.parametrize("protocol, changes", [("official", dict(epochs=10, probe_batch_size=30)),
                                               ("fast", dict(epochs=60, probe_batch_size=16, lr=1e-2))])
def test_linear_probe_separates_separable_features(protocol, changes):
    settings = dataclasses.replace(LINEAR_PROBE[protocol], num_classes=None, **changes)
    report, head = linear_probe(_separable(20), _separable(10, seed=1), settings)
    assert report["top1"] == 1.0 and report["train_top1"] == 1.0 and report["classes"] == 3
    val = _separable(10, seed=1)
    assert torch.equal(head(val.features).argmax(1), val.labels)  # the head reads raw features
    assert [h["epoch"] for h in report["history"]] == evaluation_epochs(settings.epochs, settings.eval_every)


def test_linear_probe_rejects_unlabelled_samples_and_too_few_classes():
    unlabelled = _separable(4)
    unlabelled.labels[2] = -1
    with pytest.raises(ValueError, match="training set: 1 of 12 samples have no .cls label"):
        linear_probe(unlabelled, _separable(4))
    with pytest.raises(ValueError, match="labels go up to 2 but the probe has num_classes=2"):
        linear_probe(_separable(4), _separable(4), dataclasses.replace(OFFICIAL_LP, num_classes=2))


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


def test_official_miou_averages_absent_classes_as_zero():
    target = torch.tensor([[0, 0, 1, 255]])
    pred = torch.tensor([[0, 0, 1, 3]])
    # Five classes, two present and perfect: the official mean is (1 + 1 + 0 + 0 + 0) / 5 with I / (U + 1e-6).
    official = segmentation_scores(pred, target, 5, ignore_index=255, over="all")
    assert official["miou"] == pytest.approx((2 / (2 + 1e-6) + 1 / (1 + 1e-6)) / 5)
    assert set(official["per_class_iou"]) == {0, 1, 2, 3, 4}
    present = segmentation_scores(pred, target, 5, ignore_index=255, over="present")
    assert present["miou"] == 1.0 and set(present["per_class_iou"]) == {0, 1}


def _segmentation_set(n, seed):
    """4×4 token grids whose features name the class of their token (left half 1, right half 2, ignore 0
    on the top row), labels at 16×16 pixels."""
    gen = torch.Generator().manual_seed(seed)
    token_labels = torch.tensor([1, 1, 2, 2]).repeat(4, 1)
    features = torch.stack([torch.eye(4)[token_labels.flatten()] * 3 + 0.3 * torch.randn(16, 4, generator=gen)
                            for _ in range(n)])
    seg = token_labels.repeat_interleave(4, 0).repeat_interleave(4, 1).repeat(n, 1, 1)
    seg[:, :2] = 0
    return FeatureSet(features, torch.full((n,), -1), seg.to(torch.uint8), (4, 4), [str(i) for i in range(n)])


def test_seg_probe_learns_token_classes_fast_protocol():
    settings = dataclasses.replace(SEG_PROBE["fast"], epochs=80, probe_batch_size=4, lr=3e-2)
    report, _ = seg_probe(_segmentation_set(12, 0), _segmentation_set(6, 1), settings)
    # Logits are upsampled bilinearly: the decision edge falls where the two classes' margins cross,
    # exactly on the token edge only when the margins are equal, so a pixel column there may flip.
    assert report["miou"] > 0.99 and report["pixel_accuracy"] > 0.99
    assert set(report["per_class_iou"]) == {1, 2}  # 0 is ignored


def test_seg_probe_official_head_and_protocol():
    head = TokenSegmentationHead("bn_conv", torch.zeros(1, 4, 8), num_classes=5, grid=(2, 2), size=8)
    assert head.head.kernel_size == (1, 1) and torch.all(head.head.bias == 0)
    assert 0.005 < head.head.weight.detach().std().item() < 0.02  # N(0, 0.01²)
    assert head.bn.affine and head(torch.randn(3, 4, 8)).shape == (3, 5, 8, 8)
    # ADE20K-style labels after the official shift: 255 ignored, classes 0 and 1 of 150.
    train, val = _segmentation_set(16, 0), _segmentation_set(8, 1)
    for data in (train, val):
        data.seg = torch.where(data.seg == 0, 255, data.seg.long() - 1).to(torch.uint8)
    settings = dataclasses.replace(SEG_PROBE["official"], epochs=4, lr=0.5)
    report, _ = seg_probe(train, val, settings)
    assert report["classes"] == 150 and report["ignore_index"] == 255
    assert len(report["per_class_iou"]) == 150  # every class averaged, absent ones at 0
    assert report["miou"] == pytest.approx(sum(report["per_class_iou"].values()) / 150)
    assert report["pixel_accuracy"] > 0.95 and report["miou"] > 1.9 / 150
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3, 4]
    assert report["miou"] == max(h["miou"] for h in report["history"])


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


def test_packaged_openai_lists():
    templates = read_templates("openai")
    assert len(templates) == 80 and len(set(templates)) == 80 and all("{}" in t for t in templates)
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
    names = class_names("openai")
    assert len(names) == 1000 and names[:3] == ["tench", "goldfish", "great white shark"]
    assert names[-1] == "toilet paper"
    # As published, two pairs of classes share a name (the official zero-shot reads the same list).
    duplicated = {n: [i for i, m in enumerate(names) if m == n] for n in names if names.count(n) > 1}
    assert duplicated == {"missile": [657, 744], "sunglasses": [836, 837]} and len(set(names)) == 998
    assert OPENAI_CLASSES.read_text().startswith("# ") and "openai/CLIP" in OPENAI_TEMPLATES.read_text()
    assert read_templates("builtin") == read_templates(None) and len(read_templates("builtin")) == 12


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
    assert read_templates(_write(tmp_path / "ok.txt", "# a comment\na {}\n\nthe {}\n")) == ["a {}", "the {}"]
    with pytest.raises(ValueError, match="is empty"):
        read_lines(_write(tmp_path / "e.txt", "# only a comment\n"), "class names")


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
    assert second.grid == (4, 4) and second.seg.dtype == torch.uint8
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


def _shards(root):
    return ["--train-shards", str(root / "train" / "*.tar"), "--val-shards", str(root / "val" / "*.tar")]


# The tiny model reads 32² images: the official crop (224) and segmentation input (512) are scaled down
# to keep the tests fast; everything else is the official protocol, and the JSON records the change.
TINY_CROP = ["--resize", "37", "--crop", "32"]


def test_linear_probe_tool_official_protocol_deterministic(labelled_run, tmp_path, tiny_checkpoint):
    args = _common(tiny_checkpoint, "linear-probe", *_shards(labelled_run), *TINY_CROP, "--epochs", "10")
    reports = []
    for run in ("a", "b"):
        assert muse_eval([*args, "--out", str(tmp_path / run)]) == 0
        reports.append(json.loads((tmp_path / run / "linear_probe.json").read_text()))
    first, second = reports
    assert first["protocol"] == "official" and first["deviations"] == {"resize": 37, "crop": 32, "epochs": 10}
    assert first["settings"]["optimizer"] == "sgd" and first["settings"]["nesterov"] is True
    assert first["classes"] == 1000 and first["train_samples"] == 8 and first["val_samples"] == 4
    assert [h["epoch"] for h in first["history"]] == [5, 10]
    assert first["top1"] == max(h["top1"] for h in first["history"]) and "top1_final" in first
    assert first["feature_dim"] == load_config("tiny").model.dim
    for key in ("top1", "top5", "top1_final", "train_top1", "history"):
        assert first[key] == second[key]
    assert (tmp_path / "a" / "linear_probe_head.pt").exists()


def test_linear_probe_tool_fast_protocol_with_cache(labelled_run, tmp_path, tiny_checkpoint):
    args = _common(tiny_checkpoint, "linear-probe", "--protocol", "fast", *_shards(labelled_run), "--epochs", "5",
                   "--cache", str(tmp_path / "cache"))
    assert muse_eval([*args, "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "linear_probe.json").read_text())
    assert report["protocol"] == "fast" and report["deviations"] == {"epochs": 5} and report["classes"] == 3
    assert report["settings"]["head"] == "standardize" and [h["epoch"] for h in report["history"]] == [5]
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 2
    assert muse_eval([*args, "--out", str(tmp_path / "b")]) == 0  # from the cache: the same numbers
    again = json.loads((tmp_path / "b" / "linear_probe.json").read_text())
    assert again["top1"] == report["top1"] and again["train_top1"] == report["train_top1"]


def test_seg_probe_tool_both_protocols_deterministic(labelled_run, tmp_path, tiny_checkpoint):
    official = _common(tiny_checkpoint, "seg-probe", *_shards(labelled_run), "--input-size", "64", "--epochs", "3")
    for run in ("a", "b"):
        assert muse_eval([*official, "--out", str(tmp_path / run)]) == 0
    first, second = (json.loads((tmp_path / run / "seg_probe.json").read_text()) for run in ("a", "b"))
    # 64² input: 16×16 patches of 4 px, 8×8 tokens; the last block's output; 150 classes, all averaged.
    assert first["grid"] == [8, 8] and first["settings"]["feature"] == "hidden" and first["classes"] == 150
    assert first["ignore_index"] == 255 and len(first["per_class_iou"]) == 150
    assert first["deviations"] == {"input_size": 64, "epochs": 3} and len(first["history"]) == 3
    assert first["miou"] == second["miou"] and first["history"] == second["history"]
    fast = _common(tiny_checkpoint, "seg-probe", "--protocol", "fast", *_shards(labelled_run), "--epochs", "3",
                   "--feature", "latents")
    assert muse_eval([*fast, "--out", str(tmp_path / "f")]) == 0
    report = json.loads((tmp_path / "f" / "seg_probe.json").read_text())
    assert report["classes"] == 3 and report["ignore_index"] == 0 and 0 <= report["miou"] <= 1
    assert set(map(int, report["per_class_iou"])) <= {1, 2} and report["grid"] == [4, 4]


def test_zero_shot_tool_both_protocols(labelled_run, tmp_path, tiny_checkpoint):
    classes = _write(tmp_path / "classes.txt", "red thing\ngreen thing\nblue thing\n")
    val = ["--shards", str(labelled_run / "val" / "*.tar"), "--classes", str(classes)]
    # The tiny config's text encoder is random: refused unless asked for explicitly.
    assert muse_eval(_common(tiny_checkpoint, "zero-shot", *val, "--out", str(tmp_path / "no"))) == 2
    assert not (tmp_path / "no").exists()
    official = _common(tiny_checkpoint, "zero-shot", *val, *TINY_CROP, "--allow-random-text-encoder")
    for run in ("a", "b"):
        assert muse_eval([*official, "--out", str(tmp_path / run)]) == 0
    first, second = (json.loads((tmp_path / run / "zero_shot.json").read_text()) for run in ("a", "b"))
    assert first["templates"] == 80 and first["classes"] == 3 and first["images"] == 4
    assert first["protocol"] == "official" and first["settings"]["templates"] == "openai"
    assert first["top5"] == 1.0 and first["top1"] == second["top1"]  # 3 classes: always in the top 5
    assert muse_eval(_common(tiny_checkpoint, "zero-shot", *val, "--protocol", "fast", "--allow-random-text-encoder",
                             "--out", str(tmp_path / "f"))) == 0
    assert json.loads((tmp_path / "f" / "zero_shot.json").read_text())["templates"] == 12
    dropped = _common(tiny_checkpoint, "zero-shot", *val, *TINY_CROP, "--allow-random-text-encoder",
                      "--drop-label-0", "true", "--templates", str(_write(tmp_path / "t.txt", "a {}\n")))
    assert muse_eval([*dropped, "--out", str(tmp_path / "d")]) == 0
    report = json.loads((tmp_path / "d" / "zero_shot.json").read_text())
    assert report["dropped_label_0"] == 2 and report["images"] == 2  # val labels 0, 1, 2, 0
    two = _write(tmp_path / "two.txt", "red\ngreen\n")  # labels go up to 2
    assert muse_eval(_common(tiny_checkpoint, "zero-shot", "--shards", str(labelled_run / "val" / "*.tar"), "--classes",
                             str(two), "--allow-random-text-encoder", "--out", str(tmp_path / "x"))) == 2


def test_probe_tools_report_bad_input(labelled_run, tmp_path, tiny_checkpoint):
    root = labelled_run
    unlabelled = tmp_path / "plain"
    write_shards(({"image": np.zeros((32, 32, 3), np.uint8), "caption": ""} for _ in range(2)), unlabelled)
    args = ["--train-shards", str(unlabelled / "*.tar"), "--val-shards", str(root / "val" / "*.tar"), "--epochs", "1"]
    assert muse_eval(_common(tiny_checkpoint, "linear-probe", *args, *TINY_CROP, "--out", str(tmp_path / "l"))) == 2
    assert muse_eval(_common(tiny_checkpoint, "seg-probe", *args, "--input-size", "64",
                             "--out", str(tmp_path / "s"))) == 2
    assert muse_eval(_common(tiny_checkpoint, "linear-probe", "--train-shards", str(tmp_path / "none*.tar"),
                             "--val-shards", str(root / "val" / "*.tar"), "--out", str(tmp_path / "n"))) == 2
    assert muse_eval(_common(tiny_checkpoint, "linear-probe", *_shards(root), "--feature", "pixels",
                             "--out", str(tmp_path / "k"))) == 2
    assert not any((tmp_path / d).exists() for d in ("l", "s", "n", "k"))
