"""`examples/benchmark.py --quick`: runs end to end and writes `benchmark.json` in the format of issue #5.

The quick mode trains tiny pools for a few steps, so only the structure is checked here, never a number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "benchmark.py"
TOP_KEYS = {"machine", "wall_seconds", "rows", "costs"}
ROW_KEYS = {"pool", "k", "heldout_set", "method", "accuracy", "nll", "ece", "gain_recovered", "seconds"}
OPTIONAL_KEYS = {"anchor_distance", "ensemble_agreement"}
POOLS = {"mlp_scratch", "cnn_scratch", "mlp_shared_init", "mnist_timm_resnet", "mnist_hf_vit"}
METHODS = {
    "single_mean",
    "single_best",
    "single_long",
    "ensemble",
    "weight_average",
    "aligned_average",
    "kd_anchor_1k",
    "kd_converged",
    "weightformer",
    "weightformer_in_pool",
    "weightformer_finetuned",
}
WEIGHTFORMER = {"weightformer", "weightformer_in_pool", "weightformer_finetuned"}


def _run(*args: str, timeout: float = 175) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    committed = REPO / "results" / "benchmark.json"
    before = committed.stat().st_mtime_ns if committed.exists() else None
    proc = _run("--quick", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = committed.stat().st_mtime_ns if committed.exists() else None
    assert before == after, "--quick touched results/benchmark.json"
    return out, json.loads((out / "benchmark.json").read_text())


@pytest.mark.slow
def test_quick_writes_all_outputs(quick_run):
    out, _ = quick_run
    for name in ("benchmark.json", "benchmark.md", "accuracy_vs_k.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "accuracy_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "benchmark.md").read_text()
    for pool in POOLS:
        assert f"## {pool}" in table


@pytest.mark.slow
def test_json_structure(quick_run):
    _, result = quick_run
    assert set(result) == TOP_KEYS
    assert isinstance(result["machine"], dict) and result["machine"]
    assert _number(result["wall_seconds"]) and result["wall_seconds"] > 0
    assert isinstance(result["costs"], dict)
    rows = result["rows"]
    assert isinstance(rows, list) and rows
    for row in rows:
        assert ROW_KEYS <= set(row) <= ROW_KEYS | OPTIONAL_KEYS, row
        assert row["pool"] in POOLS and row["method"] in METHODS, row
        assert isinstance(row["k"], int) and row["k"] >= 2
        assert isinstance(row["heldout_set"], int) and row["heldout_set"] >= 0
        for key in ("accuracy", "nll", "ece", "seconds"):
            assert _number(row[key]), (key, row)
        assert _number(row["gain_recovered"]) or row["gain_recovered"] is None  # null: the ensemble gains nothing
        assert 0 <= row["accuracy"] <= 1 and row["nll"] >= 0 and 0 <= row["ece"] <= 1 and row["seconds"] >= 0
        if row["method"] in WEIGHTFORMER:
            assert OPTIONAL_KEYS <= set(row), row
            assert _number(row["anchor_distance"]) and row["anchor_distance"] >= 0
            agreement = row["ensemble_agreement"]
            assert 0 <= agreement["student"] <= 1
            assert len(agreement["teachers"]) == row["k"]
            assert all(0 <= a <= 1 for a in agreement["teachers"])
        else:
            assert not OPTIONAL_KEYS & set(row), row


@pytest.mark.slow
def test_every_pool_has_every_method(quick_run):
    _, result = quick_run
    rows = result["rows"]
    assert {r["pool"] for r in rows} == POOLS
    for pool in POOLS:
        assert {r["method"] for r in rows if r["pool"] == pool} == METHODS, pool
    for row in rows:  # G is defined against the set's own mean single and ensemble
        if row["method"] == "ensemble" and row["gain_recovered"] is not None:
            assert row["gain_recovered"] == pytest.approx(1.0)
        if row["method"] == "single_mean" and row["gain_recovered"] is not None:
            assert row["gain_recovered"] == pytest.approx(0.0)


@pytest.mark.slow
def test_costs(quick_run):
    _, result = quick_run
    costs = result["costs"]
    for pool in POOLS:
        step = costs["train_step"][pool]
        assert step["batch_size"] == 256 and step["ratio"] > 0
        for ratios in costs["time_ratios"][pool].values():
            assert ratios["kd_anchor_1k_over_weightformer"] > 0 and ratios["kd_converged_over_weightformer"] > 0
        assert pool in costs["ensemble_beats_single_long"]
    memory = costs["memory_k8"]
    assert memory["k"] == 8 and memory["teacher_mib"] > 0 and memory["peak_rss_after_generation_mib"] > 0


def test_quick_refuses_committed_results():
    proc = _run("--quick", "--output_dir", "results", timeout=120)
    assert proc.returncode == 2
    assert "never writes the committed results/" in proc.stderr
