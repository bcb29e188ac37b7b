"""`examples/benchmark.py --quick` end to end: the outputs, their schema, and figures recomputed independently.

The quick mode trains tiny pools for a few steps, so no number is judged for quality; what is checked is that
the numbers mean what they say (G from the set's own teachers, held-out sets disjoint and unseen, choices made
on validation data, confidence intervals and paired gains computed as documented).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "benchmark.py"
sys.path.insert(0, str(REPO / "examples"))

TOP_KEYS = {"machine", "wall_seconds", "pools", "rows", "costs", "notes", "commands"}
ROW_KEYS = {"pool", "k", "heldout_set", "method", "accuracy", "nll", "ece", "gain_recovered", "seconds", "members"}
POOLS = {
    "mlp_scratch",
    "mlp_finetune",
    "cnn_scratch",
    "mlp_shared_init",
    "mnist_timm_resnet",
    "mnist_hf_vit",
    "mnist_timm_resnet_finetune",
}
COMMON = {"single_mean", "single_best_val", "single_long", "ensemble", "uniform_soup", "greedy_soup",
          "aligned_average", "kd_anchor_1k", "kd_converged", "weightformer", "weightformer_best_val_anchor",
          "weightformer_in_pool",
          "weightformer_finetuned", "weightformer_kd_1k"}  # fmt: skip
FINETUNE_ONLY = {"task_arithmetic", "ties_merge"}


def _run(*args: str, timeout: float = 900, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    cache = tmp_path_factory.mktemp("cache")
    committed = REPO / "results" / "benchmark.json"
    before = committed.stat().st_mtime_ns if committed.exists() else None
    proc = _run("--quick", "--output_dir", str(out), env={"WEIGHTFORMER_HF_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = committed.stat().st_mtime_ns if committed.exists() else None
    assert before == after, "--quick touched results/benchmark.json"
    return out, json.loads((out / "benchmark.json").read_text()), cache


@pytest.mark.slow
def test_outputs_and_schema(quick_run):
    out, result, _ = quick_run
    for name in ("benchmark.json", "benchmark.md", "accuracy_vs_k.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "accuracy_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "benchmark.md").read_text()
    assert all(f"## {pool}" in table for pool in POOLS)
    assert set(result) == TOP_KEYS and set(result["pools"]) == POOLS
    for row in result["rows"]:
        assert ROW_KEYS <= set(row), row
        assert len(row["members"]) == row["k"] == len(set(row["members"]))
    for pool in POOLS:
        methods = {r["method"] for r in result["rows"] if r["pool"] == pool}
        assert methods == COMMON | (FINETUNE_ONLY if pool.endswith("finetune") else set()), pool
        # the step-time ratio is taken at the batch the generator trained on: 4,096, capped at the meta split
        # on the MNIST-5k pools (1,000 meta images)
        trained, timed = result["costs"]["generator_training"][pool], result["costs"]["train_step"][pool]
        assert timed["batch_size"] == trained["batch_size"] <= trained["recipe"]["batch_size"] == 4096, pool
        assert (trained["batch_size"] < 4096) == pool.startswith("mnist_"), pool


@pytest.mark.slow
def test_figures_match_the_pool_manifest(quick_run):
    """single_mean and G recomputed from the teachers' test accuracies that the pool build recorded."""
    from benchmarking import plans

    _, result, cache = quick_run
    os.environ["WEIGHTFORMER_HF_CACHE"] = str(cache)
    try:
        by_name = {p.name: p for p in plans.quick_plans()}
        for pool, entry in result["pools"].items():
            plan = by_name[pool]
            manifest = json.loads((plan.folder() / "pool.json").read_text())
            assert entry["num_train_teachers"] == len(plan.train_ids)
            assert entry["num_heldout_teachers"] == plan.num_teachers - plan.num_train
            acc = manifest["test_accuracy"]
            for row in (r for r in result["rows"] if r["pool"] == pool and r["method"] == "single_mean"):
                expected = sum(acc[m] for m in row["members"]) / row["k"]
                assert row["accuracy"] == pytest.approx(expected, abs=1e-6), (pool, row["members"])
    finally:
        os.environ.pop("WEIGHTFORMER_HF_CACHE")


@pytest.mark.slow
def test_heldout_sets_are_disjoint_and_unseen(quick_run):
    _, result, _ = quick_run
    for pool, entry in result["pools"].items():
        train = set(range(entry["num_train_teachers"]))
        validation = set(range(len(train), len(train) + entry["num_validation_teachers"]))
        for k in {r["k"] for r in result["rows"] if r["pool"] == pool}:
            sets = {r["heldout_set"]: r["members"] for r in result["rows"]
                    if r["pool"] == pool and r["k"] == k and r["method"] == "weightformer"}  # fmt: skip
            members = [m for s in sets.values() for m in s]
            assert sets and len(members) == len(set(members)), (pool, k)  # disjoint within K
            assert not set(members) & (train | validation), (pool, k)  # nor trained on, nor chose the step
            in_pool = [r["members"] for r in result["rows"]
                       if r["pool"] == pool and r["k"] == k and r["method"] == "weightformer_in_pool"]  # fmt: skip
            assert in_pool and all(set(m) <= train for m in in_pool), (pool, k)


@pytest.mark.slow
def test_single_best_val_and_greedy_soup_choose_on_validation(quick_run):
    """single_best_val is the set's most accurate teacher on the meta split (recomputed here for the MNIST-1D
    pools, whose data is cheap to reload; the first of equals), and greedy soup starts from it."""
    from benchmarking import plans
    from benchmarking.methods import model_logits

    _, result, cache = quick_run
    rows = result["rows"]
    meta_accuracy = {}
    os.environ["WEIGHTFORMER_HF_CACHE"] = str(cache)
    try:
        for plan in (p for p in plans.quick_plans() if p.dataset == "mnist1d"):
            teachers, data, _, _ = plans.load(plan, log=lambda *a: None)
            meta_accuracy[plan.name] = [(model_logits(teachers.model(i), data.meta_x).argmax(-1) == data.meta_y)
                                        .float().mean().item() for i in range(len(teachers))]  # fmt: skip
    finally:
        os.environ.pop("WEIGHTFORMER_HF_CACHE")
    checked = 0
    for best in (r for r in rows if r["method"] == "single_best_val" and r["pool"] in meta_accuracy):
        scores = [meta_accuracy[best["pool"]][m] for m in best["members"]]
        assert best["chosen"] == best["members"][max(range(len(scores)), key=lambda i: (scores[i], -i))], best
        checked += 1
    assert checked >= 6
    for row in (r for r in rows if r["method"] == "greedy_soup"):
        best = next(r for r in rows if r["method"] == "single_best_val" and r["pool"] == row["pool"]
                    and r["k"] == row["k"] and r["heldout_set"] == row["heldout_set"])  # fmt: skip
        assert row["kept"][0] == best["chosen"]  # the soup starts from the validation-best teacher
        if len(row["kept"]) == 1:  # a soup of one is that teacher: same test predictions
            assert row["accuracy"] == pytest.approx(best["accuracy"], abs=1e-9)


@pytest.mark.slow
def test_summary_ci_and_paired_gain(quick_run):
    from benchmarking import report

    _, result, _ = quick_run
    summary = report.summarize(result["rows"])
    cell = summary["mlp_scratch"][2]["weightformer"]
    gs = [r["gain_recovered"] for r in result["rows"]
          if r["pool"] == "mlp_scratch" and r["k"] == 2 and r["method"] == "weightformer"]  # fmt: skip
    anchors = {r["heldout_set"]: r["anchor_gain_recovered"] for r in result["rows"]
               if r["pool"] == "mlp_scratch" and r["k"] == 2 and r["method"] == "single_mean"}  # fmt: skip
    assert cell["gain_recovered"] == pytest.approx(sum(gs) / len(gs))
    diffs = [r["gain_recovered"] - anchors[r["heldout_set"]] for r in result["rows"]
             if r["pool"] == "mlp_scratch" and r["k"] == 2 and r["method"] == "weightformer"]  # fmt: skip
    assert cell["paired_gain_over_anchor"] == pytest.approx(sum(diffs) / len(diffs))
    soup = {r["heldout_set"]: r["gain_recovered"] for r in result["rows"]
            if r["pool"] == "mlp_scratch" and r["k"] == 2 and r["method"] == "greedy_soup"}  # fmt: skip
    versus = [g - soup[i] for i, g in enumerate(gs)]
    assert cell["paired_vs"]["greedy_soup"]["mean"] == pytest.approx(sum(versus) / len(versus))
    assert cell["paired_vs"]["greedy_soup"]["wins"] == sum(v > 0 for v in versus)


def test_mean_ci_hand_computed():
    from benchmarking.report import mean_ci

    mean, half = mean_ci([1.0, 2.0, 3.0])  # sd 1, n 3, t(0.975, 2) = 4.302653
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert math.isnan(mean_ci([5.0])[1]) and mean_ci([5.0])[0] == 5.0


def test_anchor_table_hand_computed():
    """The README's small-pool rows: the anchor's accuracy rebuilt from the set's mean single accuracy and its
    G, the student's change per set, methods a pool lacks as a dash, in-pool extras left out."""
    from benchmarking import report

    def row(k, s, method, accuracy, **extra):
        return {"pool": "p", "k": k, "heldout_set": s, "method": method, "accuracy": accuracy, **extra}

    rows = []
    for s, (single, anchor_g, ensemble, student) in enumerate([(0.80, 0.5, 0.84, 0.83), (0.90, -1.0, 0.92, 0.89)]):
        rows += [row(4, s, "single_mean", single, anchor_gain_recovered=anchor_g), row(4, s, "ensemble", ensemble),
                 row(4, s, "weightformer", student), row(4, s, "greedy_soup", 0.85)]  # fmt: skip
    rows.append(row(4, 2, "weightformer_in_pool", 0.5))  # an in-pool set: no ensemble row, not a held-out set
    result = {"rows": rows, "costs": {"generator_training": {"p": {"validation": {"kept_step": 450}}}}}
    # anchors: 0.80 + 0.5 × 0.04 = 0.82 and 0.90 − 1.0 × 0.02 = 0.88; the student: +1.0 and +1.0 pp
    assert report.anchor_table(result) == [
        "| p | 4 | 450 | 85.00 | 86.00 | +1.0 / +1.0 | — | 85.00 | — | — | — | 88.00 |"
    ]


def test_kd_baselines_share_the_generators_objective_unless_told():
    import benchmark

    assert benchmark.parse_args(["--gen_alpha", "0.4"]).alpha == 0.4  # the same objective, as examples/train.py
    assert benchmark.parse_args(["--gen_alpha", "0.4", "--alpha", "0.9"]).alpha == 0.9


def test_quick_refuses_committed_results(capsys):
    """Refused while parsing the flags, before anything runs."""
    import benchmark

    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(["--quick", "--output_dir", str(REPO / "results")])
    assert exit_info.value.code == 2
    assert "never writes the committed results/" in capsys.readouterr().err


@pytest.mark.slow
def test_combine_merges_runs_of_separate_pools(quick_run, tmp_path):
    import benchmark

    out, result, _ = quick_run
    halves = [("mlp_scratch",), tuple(p for p in result["pools"] if p != "mlp_scratch")]
    folders = []
    for i, names in enumerate(halves):
        rows = [r for r in result["rows"] if r["pool"] in names]
        pools = {p: v for p, v in result["pools"].items() if p in names}
        part = {**result, "rows": rows, "pools": pools, "commands": [f"run {i}"]}
        folder = tmp_path / f"part{i}"
        folder.mkdir()
        (folder / "benchmark.json").write_text(json.dumps(part))
        (folder / "benchmark.md").write_text((out / "benchmark.md").read_text())
        folders.append(folder)
    merged = benchmark.combine(folders, tmp_path / "merged")
    assert merged["commands"] == ["run 0", "run 1"]
    assert merged["wall_seconds"] == pytest.approx(2 * result["wall_seconds"])
    assert [r["method"] for r in merged["rows"]] == [r["method"] for r in result["rows"]]
    assert set(merged["pools"]) == set(result["pools"])
    assert "Command: `run 0 ; run 1`" in (tmp_path / "merged" / "benchmark.md").read_text()


@pytest.mark.slow
def test_validation_teachers_choose_the_kept_step(quick_run):
    _, result, _ = quick_run
    trained = result["costs"]["generator_training"]
    assert [pool for pool in trained if "validation" in trained[pool]] == ["cnn_scratch"]  # the quick plan's only
    val = trained["cnn_scratch"]["validation"]
    steps = [c[0] for c in val["curve"]]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == trained["cnn_scratch"]["steps"]
    assert val["kept_step"] == min(val["curve"], key=lambda c: c[1])[0]  # the lowest loss, earliest on ties
    assert val["teachers"] == [2, 3] and val["rows_trained_on"]  # the last 2 of its 4 generator teachers


def test_validation_rows_are_kept_out_of_the_generators_batches():
    import torch
    from benchmarking import methods, plans

    data = plans.Split(*(torch.arange(n).float() for n in (5, 5)), torch.randn(50, 3), torch.arange(50) % 10,
                       torch.zeros(1), torch.zeros(1))  # fmt: skip
    trained_on, held = methods.meta_rows(data, 0.2)
    assert len(held) == 10 and sorted(trained_on + held) == list(range(50))
    assert methods.meta_rows(data, 0.0) == (list(range(50)), [])
    seen = {int(i) for batch in methods.meta_loader(data, 8, seed=0, rows=trained_on) for i in batch["index"]}
    assert seen <= set(trained_on) and len(seen) == 40  # 5 full batches of 8: every row, none held out
    assert all(torch.equal(b["inputs"], data.meta_x[b["index"]]) for b in methods.meta_loader(data, 8, 0, rows=held))
    row = methods.meta_loader(data, 8, 0, rows=held).dataset[3]  # one row, as a map-style dataset gives it
    assert int(row["index"]) == held[3] and torch.equal(row["inputs"], data.meta_x[held[3]])
    assert row["inputs"].shape == (3,) and int(row["labels"]) == held[3] % 10


def test_step_costs_only_times_each_pools_architecture_without_building_it(tmp_path, monkeypatch):
    import benchmark
    import torch
    from benchmarking import plans

    monkeypatch.setenv("WEIGHTFORMER_HF_CACHE", str(tmp_path / "cache"))

    def no_pool(*args, **kwargs):
        raise AssertionError("--step_costs_only built or loaded a pool")

    monkeypatch.setattr(plans, "build", no_pool)
    monkeypatch.setattr(plans, "load", no_pool)
    out, threads = tmp_path / "out", torch.get_num_threads()
    argv = ["--quick", "--step_costs_only", "--pools", "mlp_scratch", "--output_dir", str(out)]
    try:  # main() sets torch's threads from OMP_NUM_THREADS, for this process
        result = benchmark.main(argv)
    finally:
        torch.set_num_threads(threads)
    written = json.loads((out / "train_step_costs.json").read_text())
    assert written["train_step"] == result["train_step"] and set(written["train_step"]) == {"mlp_scratch"}
    costs = written["train_step"]["mlp_scratch"]
    assert costs["k"] == 4 and costs["batch_size"] == 4096  # the quick pool's 4,100 meta rows hold one batch
    assert costs["generator_step_seconds"] > 0 and costs["student_kd_step_seconds"] > 0
    assert costs["ratio"] == costs["generator_step_seconds"] / costs["student_kd_step_seconds"]
    assert written["commands"] == ["OMP_NUM_THREADS=1 python examples/benchmark.py " + " ".join(argv)]
    assert not (out / "benchmark.json").exists()
