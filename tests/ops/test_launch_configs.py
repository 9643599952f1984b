"""The committed launch-configuration table: coverage, bucket lookup, AOT in step with it, and the
tuner's writer."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import tune_configs
from muse_kernels import aot
from muse_kernels.ops import synergistic_attention as op

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def table_file(tmp_path, monkeypatch):
    """A copy of the committed table that a test may edit; the lookup reads it."""
    path = tmp_path / "launch_configs.json"
    path.write_text(op.LAUNCH_TABLE_PATH.read_text())
    monkeypatch.setattr(op, "LAUNCH_TABLE_PATH", path)
    op.launch_table.cache_clear()
    yield path
    op.launch_table.cache_clear()


def test_every_kernel_has_a_config_for_any_n():
    for kernel in ("fwd", "maps", "bwd"):
        for dim in op.SUPPORTED_HEAD_DIMS:
            for dtype in DTYPES:
                for seq in (1, 257, 10 ** 6):
                    assert op.launch_config(kernel, dim, dtype, seq).block_m > 0


def test_single_pass_entries_are_the_key_tiles():
    for dim in op.SUPPORTED_HEAD_DIMS:
        for dtype in op.SINGLE_PASS_DTYPES:
            for variant, tiles in (("per_head", op.SINGLE_PASS_KEY_TILES), ("head_mean", op.SINGLE_PASS_KEY_TILES),
                                   ("head_mean_loss", op.SINGLE_PASS_LOSS_KEY_TILES)):
                rows = op.launch_table().get(("single_pass", variant, dim, {torch.float16: "fp16",
                                                                            torch.bfloat16: "bf16"}[dtype]), ())
                assert [max_seq for max_seq, _ in rows] == list(tiles.get(dim, ())), (variant, dim, dtype)
                assert all(cfg.block_n == max_seq for max_seq, cfg in rows)


def _add_bucket(path, kernel, dim, dtype, max_seq, **config):
    table = json.loads(path.read_text())
    table["entries"].append(dict(kernel=kernel, variant="", head_dim=dim, dtype=dtype, max_seq=max_seq,
                                 source="test", **config))
    path.write_text(json.dumps(table))
    op.launch_table.cache_clear()


def test_lookup_takes_the_smallest_bucket_that_holds_n(table_file):
    any_n = op.launch_config("fwd", 64, torch.bfloat16, 100)
    _add_bucket(table_file, "fwd", 64, "bf16", 128, block_m=32, block_n=32, num_warps=2, num_stages=1)
    small = op.LaunchConfig(32, 32, 2, 1)
    assert [op.launch_config("fwd", 64, torch.bfloat16, n) for n in (1, 128, 129, 4096)] == \
        [small, small, any_n, any_n]
    # The launcher uses the bucket of its key count.
    assert op.fwd_config(64, torch.bfloat16, 100) == small


def test_a_missing_entry_names_what_was_looked_up(table_file):
    table = json.loads(table_file.read_text())
    table["entries"] = [e for e in table["entries"] if not (e["kernel"] == "bwd" and e["head_dim"] == 32)]
    table_file.write_text(json.dumps(table))
    op.launch_table.cache_clear()
    with pytest.raises(LookupError, match=r"kernel='bwd'.*head_dim=32.*N=77"):
        op.bwd_config(32, torch.float16, 77)


def test_aot_compiles_every_table_entry(table_file):
    """A new bucket's configuration becomes compiled variants of its kernel (test_aot compiles them)."""
    _add_bucket(table_file, "maps", 64, "bf16", 256, block_m=32, block_n=128, num_warps=4, num_stages=2)
    groups = {(s.kernel, dict(s.constexprs)["BLOCK_M"], dict(s.constexprs).get("BLOCK_N"), s.num_warps, s.num_stages)
              for s in aot.kernel_specs() if dict(s.constexprs)["HEAD_DIM"] == 64}
    assert ("_synergistic_attention_maps_kernel", 32, 128, 4, 2) in groups
    for kernel in ("fwd", "maps", "bwd"):
        for dim in op.SUPPORTED_HEAD_DIMS:
            for dtype in DTYPES:
                assert op.table_configs(kernel, dim, dtype)


def test_tuner_writes_the_fastest_correct_config_per_n(table_file):
    def row(seq, block_m, ms, diff=0.0):
        return dict(family="maps", shape=(32, 8, seq, 64), ms=ms, max_diff_vs_current=diff,
                    config=dict(block_m=block_m, block_n=64, num_warps=4, num_stages=2))
    rows = [row(256, 64, 0.30), row(256, 128, 0.20), row(256, 32, 0.10, diff=1.0),  # wrong: skipped
            row(1024, 64, 1.0), row(1024, 128, 1.5), dict(family="maps", shape=(32, 8, 1024, 64), error="x",
                                                         config={})]
    entries = tune_configs.table_entries(rows, "bf16", "timed on test")
    assert [(e["max_seq"], e["block_m"]) for e in entries] == [(256, 128), (None, 64)]
    before = op.launch_config("fwd", 64, torch.bfloat16, 300)
    tune_configs.write_table(str(table_file), entries)
    op.launch_table.cache_clear()
    assert op.launch_config("maps", 64, torch.bfloat16, 200) == op.LaunchConfig(128, 64, 4, 2)
    assert op.launch_config("maps", 64, torch.bfloat16, 5000) == op.LaunchConfig(64, 64, 4, 2)
    # Other kernels' and dtypes' entries are kept.
    assert op.launch_config("fwd", 64, torch.bfloat16, 300) == before
    assert op.launch_config("maps", 64, torch.float16, 200) == op.maps_config(64, torch.float16, 200)
