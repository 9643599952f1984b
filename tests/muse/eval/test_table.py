"""table: every Table-1 metric with its data in one Markdown row beside the paper's, on tiny."""

import json

import numpy as np
import pytest

from muse.data import write_shards
from muse.eval.__main__ import main as muse_eval
from muse.eval.table import PAPER, parse_overrides, row_values


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """imagenet-{train,val} with class labels, ade20k-{train,val} with label maps, in the --data layout."""
    root = tmp_path_factory.mktemp("table")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        classified = [{"image": rng.integers(0, 255, (36, 40, 3), dtype=np.uint8), "caption": "", "cls": i % 3}
                      for i in range(count)]
        write_shards(classified, root / f"imagenet-{split}", samples_per_shard=4)
        segmented = []
        for i in range(count):
            labels = np.zeros((36, 40), dtype=np.uint8)
            labels[:, 20:] = 1 + i % 2
            segmented.append({"image": rng.integers(0, 255, (36, 40, 3), dtype=np.uint8), "caption": "", "seg": labels})
        write_shards(segmented, root / f"ade20k-{split}", samples_per_shard=4)
    return root


# Scaled to the tiny model's 32² input and few epochs; recorded as changes in the notes.
TINY = ["--set", "linear-probe.resize=37", "--set", "linear-probe.crop=32", "--set", "linear-probe.epochs=5",
        "--set", "zero-shot.resize=37", "--set", "zero-shot.crop=32", "--set", "zero-shot.templates=builtin",
        "--set", "seg-probe.input_size=64", "--set", "seg-probe.epochs=2"]


def test_table_row_beside_the_papers(data, tmp_path, tiny_checkpoint):
    classes = tmp_path / "classes.txt"
    classes.write_text("red\ngreen\nblue\n")
    args = ["table", "--config", "tiny", "--checkpoint", str(tiny_checkpoint), "--data", str(data), "--skip", "fid",
            "--allow-random-text-encoder", *TINY, "--set", f"zero-shot.classes={classes}"]
    assert muse_eval([*args, "--out", str(tmp_path / "a")]) == 0
    text = (tmp_path / "a" / "table.md").read_text()
    lines = text.splitlines()
    assert lines[0].startswith("| | rFID")
    assert lines[2] == "| paper (MUSE-1B, Table 1) | 0.62 | 24.9 | 0.78 | 76.1 | 85.2 | 46.5 |"
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[0] == "run (official protocol)" and cells[1] == "—"  # rFID skipped
    assert all(c != "—" for c in cells[2:]) and "(correct:" in cells[3]
    assert "rFID and IS not measured" in text and "changed: {'resize': 37" in text
    report = json.loads((tmp_path / "a" / "table.json").read_text())
    assert report["paper"] == PAPER and set(report["results"]) == {"recon-metrics", "zero-shot", "linear-probe",
                                                                    "seg-probe"}
    assert report["results"]["seg-probe"]["classes"] == 150 and report["results"]["zero-shot"]["templates"] == 12
    assert muse_eval([*args, "--out", str(tmp_path / "b")]) == 0  # the same checkpoint: the same row
    assert (tmp_path / "b" / "table.md").read_text() == text


def test_table_leaves_out_what_has_no_data(data, tmp_path, tiny_checkpoint):
    args = ["table", "--config", "tiny", "--checkpoint", str(tiny_checkpoint), "--imagenet-val",
            str(data / "imagenet-val" / "*.tar"), "--skip", "fid", "--out", str(tmp_path)]
    assert muse_eval(args) == 0  # recon-metrics measured; the probes lack training data; zero-shot refused
    text = (tmp_path / "table.md").read_text()
    assert "linear-probe: not measured (no imagenet-train shards)" in text
    assert "seg-probe: not measured (no ade20k-train / ade20k-val shards)" in text
    assert "zero-shot: not measured (zero-shot: model.text.pretrained is not set" in text
    assert muse_eval(["table", "--config", "tiny", "--out", str(tmp_path / "none")]) == 2
    empty = ["table", "--config", "tiny", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "e")]
    assert muse_eval(empty) == 2


def test_overrides_are_typed_and_checked():
    chosen = parse_overrides(["seg-probe.input_size=64", "linear-probe.l2-normalize=false",
                              "recon-metrics.round_8bit=0"], "official")
    assert chosen["seg-probe"][0].input_size == 64 and chosen["seg-probe"][1] == {"input_size": 64}
    assert chosen["linear-probe"][0].l2_normalize is False and chosen["recon-metrics"][0].round_8bit is False
    assert chosen["zero-shot"][1] == {}
    with pytest.raises(ValueError, match="no setting 'epoch'"):
        parse_overrides(["linear-probe.epoch=3"], "official")
    with pytest.raises(ValueError, match="expected a value of type int"):
        parse_overrides(["linear-probe.epochs=many"], "official")
    with pytest.raises(ValueError, match="tool.setting=value"):
        parse_overrides(["epochs=3"], "official")
    assert row_values({})["rfid"] == "—"
