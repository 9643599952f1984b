"""Checkpoint files: damaged ones named, failed writes leave nothing behind, the config they record."""

import errno
import re

import pytest
import torch

from muse.config import load_config
from muse.training import checkpoint as ckpt


def _save(tmp_path, step, **extra):
    return ckpt.save_checkpoint({"step": step, "weights": torch.arange(4.0), **extra}, tmp_path, step)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_checkpoint_is_named_when_loaded(tmp_path, damage):
    path = _save(tmp_path, 1)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00 not a checkpoint" * 20,
                      "empty": b""}[damage])
    # It used to be a bare OSError / RuntimeError from torch's zip reader, without the file's name.
    with pytest.raises(Exception, match=re.escape(str(path)) + " cannot be read, it is damaged or incomplete"):
        ckpt.load_checkpoint(path)


def _failing_save(error):
    def save(state, f):
        f.write(b"half a checkpoint")  # what the disk took before it filled up
        raise error
    return save


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"),
                                   OSError(errno.ENOSPC, "No space left on device")])
def test_a_failed_write_leaves_no_temporary_file_and_a_clear_error(tmp_path, monkeypatch, error):
    previous = _save(tmp_path, 1)
    monkeypatch.setattr(torch, "save", _failing_save(error))
    with pytest.raises(Exception, match=r"could not write checkpoint .*step_00000002\.pt .*disk full or the folder "
                                        r"read-only\? The previous checkpoints are intact"):
        ckpt.save_checkpoint({"step": 2}, tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [previous.name]
    monkeypatch.undo()
    assert ckpt.load_checkpoint(previous)["step"] == 1


def test_the_newest_readable_checkpoint_is_found_and_the_damaged_ones_set_aside(tmp_path, caplog):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    (tmp_path / "step_00000003.pt").write_bytes(b"cut")
    path, state = ckpt.load_newest_readable(tmp_path)
    assert path.name == "step_00000002.pt" and state["step"] == 2
    assert (tmp_path / "step_00000003.pt.damaged").exists() and "step_00000003.pt cannot be read" in caplog.text
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002.pt"
    for name in ("step_00000001.pt", "step_00000002.pt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="none of the 2 checkpoints"):
        ckpt.load_newest_readable(tmp_path)
    assert ckpt.load_newest_readable(tmp_path / "no_run_here") is None


def test_the_recorded_config_refuses_another_architecture_and_names_the_keys(caplog):
    trained = load_config("tiny/stage1")
    state = ckpt.config_record(trained)
    ckpt.check_config(state, load_config("tiny/stage1"), "ckpt")  # the same config
    # Input size, local paths and the stage's training settings are not the weights' architecture.
    ckpt.check_config(state, load_config("tiny/stage3", ["model.image_size=64"]), "ckpt")
    with pytest.raises(ckpt.ConfigMismatch, match=r"ckpt was trained with a different config "
                                                  r"\(model\.encoder\.num_heads: checkpoint 2, config 4; "
                                                  r"model\.num_blocks: checkpoint 2, config 3\)"):
        ckpt.check_config(state, load_config("tiny/stage1", ["model.encoder.num_heads=4", "model.num_blocks=3"]),
                          "ckpt")
    with pytest.raises(ckpt.ConfigMismatch, match=r"train\.stage: checkpoint 1, config 3"):
        ckpt.check_config(state, load_config("tiny/stage3"), "ckpt", purpose="resume")
    with pytest.raises(ckpt.ConfigMismatch, match="a stage-1 checkpoint: stage 1 starts from an earlier stage"):
        ckpt.check_config(state, trained, "ckpt", purpose="init")
    ckpt.check_config(state, load_config("tiny/stage2"), "ckpt", purpose="init")
    ckpt.check_config(state, load_config("tiny/stage1", ["optim.lr=0.5"]), "ckpt", purpose="resume")
    assert "optim.lr (0.001 → 0.5)" in caplog.text
    ckpt.check_config({}, trained, "old.pt")
    assert "old.pt records no config" in caplog.text


def test_a_file_or_a_run_folders_newest_readable_checkpoint(tmp_path):
    from muse.training.checkpoint import load_file_or_newest

    for step in (1, 2):
        ckpt.save_checkpoint({"step": step}, tmp_path / "run", step)
    file, state = load_file_or_newest(tmp_path / "run", "--generator")
    assert file.name == "step_00000002.pt" and state["step"] == 2
    (tmp_path / "run" / "step_00000002.pt").write_bytes(b"truncated")
    file, state = load_file_or_newest(tmp_path / "run", "--generator")
    assert state["step"] == 1
    file, state = load_file_or_newest(tmp_path / "run" / "step_00000001.pt", "--generator")
    assert state["step"] == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train.init_weight: no checkpoint in .*empty"):
        load_file_or_newest(tmp_path / "empty", "train.init_weight")
    with pytest.raises(FileNotFoundError, match=r"--generator: no checkpoint file or run folder at .*missing"):
        load_file_or_newest(tmp_path / "missing", "--generator")
