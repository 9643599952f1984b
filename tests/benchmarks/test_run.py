"""The benchmark harness end to end on CPU (``--smoke``): it checks the harness, not speed."""

import csv
import json

import pytest
import torch

from benchmarks import bench_model, bench_synergistic_attention, bench_topology_kl_loss
from benchmarks.run import main


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["--smoke", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_every_case_is_reported_with_provenance(smoke_run):
    out, data = smoke_run
    info = data["provenance"]
    for key in ("date", "command", "git_sha", "torch", "triton", "device"):
        assert key in info, key
    assert "--smoke" in info["command"]
    rows = data["results"]
    expected = 0
    for module in (bench_synergistic_attention, bench_topology_kl_loss):
        expected += 2 * len(module.VARIANTS) * len(module.MODES) * len(module.PROVIDERS)
    expected += len(bench_model.VARIANTS) * len(bench_model.PROVIDERS)  # one smoke shape per variant
    assert len(rows) == expected
    with open(out / "results.csv") as f:
        assert len(list(csv.reader(f))) == expected + 1


def test_cpu_providers_are_measured_and_gpu_only_ones_skipped_with_a_reason(smoke_run):
    _, data = smoke_run
    by_provider = {}
    for row in data["results"]:
        by_provider.setdefault(row["provider"], set()).add(row["status"])
    for provider in ("eager", "ours", "sdpa_math"):
        assert by_provider[provider] == {"ok"}, provider
    for provider in ("sdpa_flash", "cuda"):
        assert by_provider[provider] == {"skipped"}, provider
    for row in data["results"]:
        if row["status"] == "ok":
            assert row["ms_p20"] <= row["ms_median"] <= row["ms_p80"]
            if row["op"] == bench_model.OP:
                assert row["extra"]["img_per_s"] == pytest.approx(row["shape"]["B"] / (row["ms_median"] / 1e3))
            else:
                assert row["tflops"] > 0
        else:
            assert row["reason"]


def test_model_level_cases_run_both_providers(smoke_run):
    _, data = smoke_run
    rows = [r for r in data["results"] if r["op"] == bench_model.OP]
    assert {(r["variant"], r["provider"]) for r in rows} == {(v, p) for v in bench_model.VARIANTS
                                                             for p in bench_model.PROVIDERS}
    assert all(r["status"] == ("skipped" if r["provider"] == "cuda" else "ok") for r in rows)


def test_table_and_plots_are_written(smoke_run):
    out, _ = smoke_run
    table = (out / "results.md").read_text()
    assert "| op | variant | mode |" in table and "Command:" in table
    # A CPU smoke run measures none of the targets' GPU cases: each is reported, none as met.
    targets = (out / "targets.md").read_text()
    assert "| target | case |" in targets and "| met |" not in targets
    assert len(list(out.glob("*.png"))) >= 4


def test_replot_rewrites_table_and_plots_from_results_json(smoke_run, tmp_path):
    out, _ = smoke_run
    (tmp_path / "results.json").write_text((out / "results.json").read_text())
    assert main(["--replot", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_text() == (out / "results.md").read_text()
    assert (tmp_path / "results.csv").read_text() == (out / "results.csv").read_text()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(p.name for p in out.glob("*.png"))
    assert main(["--replot", str(tmp_path / "missing")]) == 2


def test_a_run_cut_short_by_sigterm_still_writes_what_it_measured(tmp_path):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # the handler is in place once measuring starts; cut after the first case
        lines.append(line)
        if line.startswith("measured 1/"):
            break
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    output = "".join(lines) + output
    assert proc.returncode == 0, output
    saved = json.loads((tmp_path / "results.json").read_text())
    if "interrupted_after" not in saved["provenance"]:
        pytest.skip("the smoke run finished before the signal: nothing was cut short")
    assert 0 < len(saved["results"]) < 300


def test_without_gpu_and_without_smoke_exits_with_a_message(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["--shapes", "muse"]) == 2


def test_model_level_providers_compute_the_same_loss():
    device = torch.device("cpu")
    x = torch.randn(2, 16, 32)
    teacher = torch.softmax(torch.randn(2, 16, 16), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(2, bench_model.TEXT_DIM), dim=-1)
    losses = []
    for provider in ("eager", "ours"):
        torch.manual_seed(0)
        backend, fused = bench_model._backend(provider, device)
        losses.append(bench_model.Connector(32, 2, 3, backend, fused)(x, teacher, text))
    torch.testing.assert_close(losses[0], losses[1])


@pytest.mark.parametrize("module", ("benchmarks.profile_kernels", "benchmarks.tune_configs"))
def test_gpu_only_tools_exit_with_a_message_without_a_gpu(module, caplog):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    import importlib

    assert importlib.import_module(module).main([]) == 2
    assert "no CUDA device" in caplog.text


def test_cpu_percentiles_stay_within_the_measured_samples(monkeypatch):
    from benchmarks import common

    # Two timings, 1 ms and 10 ms: the "exclusive" quantiles used to give p20 = -2.6 ms.
    clock = iter([0.0, 0.001, 1.0, 1.010])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    median, p20, p80 = common._time_cpu(lambda: None, reps=2)
    assert 1.0 - 1e-9 <= p20 <= median <= p80 <= 10.0 + 1e-9
    assert (median, p20, p80) == pytest.approx((5.5, 2.8, 8.2))
    assert common.sample_quantiles([3.0]) == (3.0, 3.0, 3.0)


def test_the_default_output_folder_is_outside_the_source_tree_or_git_ignored(tmp_path, monkeypatch):
    import os
    import subprocess

    import benchmarks
    from benchmarks.run import default_out_dir

    package = os.path.dirname(os.path.abspath(benchmarks.__file__))
    monkeypatch.chdir(tmp_path)
    assert default_out_dir({"gpu": None}) == str(tmp_path / "bench_results" / "cpu")
    # Run from the repository root, it lands in an ignored folder: `git status` stays clean.
    root = os.path.dirname(package)
    monkeypatch.chdir(root)
    out = default_out_dir({"gpu": "NVIDIA H100 80GB HBM3"})
    assert not out.startswith(package + os.sep)
    ignored = subprocess.run(["git", "check-ignore", "-q", os.path.relpath(out, root)], cwd=root)
    assert ignored.returncode == 0, f"{out} is not git-ignored"


def test_a_run_folder_is_read_by_the_targets_command(smoke_run, capsys):
    from benchmarks.targets import ROWS, load_run_folder, main as targets_main

    out, data = smoke_run
    folder = load_run_folder(str(out))
    assert len(folder.results) == len(data["results"]) and folder.timing_basis == "wall"
    assert targets_main([str(out), "--markdown"]) == 0
    table = capsys.readouterr().out
    # On CPU no row's GPU cases are measured: every row is listed, none met.
    assert all(f"| {row.target}" in table for row in ROWS)
    assert "| met |" not in table and "`python -m benchmarks.run --smoke" in table
