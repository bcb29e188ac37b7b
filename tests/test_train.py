"""`examples/train.py` run for real in subprocesses, in the style of accelerate's example tests.

A tiny preset (MLPs 40-32-32-10, 6 teachers of 200 steps, 1.5k MNIST-1D samples, a 1-block generator) and
its pool are built once per session, so each run spends its time importing, not training.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "examples" / "train.py")
sys.path.insert(0, str(REPO / "examples"))  # `import train` in the in-process tests
TINY = {
    "dataset_name": "mnist1d",
    "mnist1d": {"num_samples": 1500, "train_split": 2 / 3, "meta_samples": 512, "meta_seed": 4242},
    "pool": {
        "model": {"model_type": "wf_mlp", "in_features": 40, "hidden_sizes": [32, 32]},
        "num_teachers": 6, "train_steps": 200, "batch_size": 64, "learning_rate": 0.002,
    },
    "generator": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "intermediate_size": 64},
    "k_min": 2, "k_max": 3, "alpha": 0.9, "temperature": 4.0, "lr_scheduler_type": "cosine",
    "weight_decay": 0.01, "max_grad_norm": 1.0, "num_eval_teachers": 2, "eval_k": 2, "num_heldout_sets": 2,
    "max_train_steps": 4, "per_device_train_batch_size": 64, "learning_rate": 0.001, "num_warmup_steps": 1,
}  # fmt: skip
SET_KEYS = {"teachers", "anchor", "single_mean_accuracy", "ensemble_accuracy", "student_accuracy",
            "gain_recovered", "student_nll", "student_ece"}  # fmt: skip

# Records every file a rank opens for writing under $WF_AUDIT_ROOT (Python-level opens: json, pickle, torch).
SITECUSTOMIZE = """
import atexit, os, sys
_root, _log, _rank = os.environ.get("WF_AUDIT_ROOT"), os.environ.get("WF_AUDIT_LOG"), os.environ.get("RANK")
if _root and _log and _rank is not None:
    _seen = []
    def _hook(event, args):
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        mode, flags = args[1], args[2] or 0
        if isinstance(mode, str):
            writes = any(c in mode for c in "wax+")
        else:
            writes = bool(flags & (os.O_WRONLY | os.O_RDWR))
        if writes and os.fsdecode(args[0]).startswith(_root):
            _seen.append(os.fsdecode(args[0]))
    sys.addaudithook(_hook)
    atexit.register(lambda: open(os.path.join(_log, f"rank{_rank}.txt"), "w").write("\\n".join(_seen)))
"""


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny preset file, an environment for runs, and its pool and datasets built once."""
    root = tmp_path_factory.mktemp("train")
    preset = root / "tiny.json"
    preset.write_text(json.dumps(TINY))
    env = {**os.environ, "WEIGHTFORMER_HF_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    os.environ["WEIGHTFORMER_HF_CACHE"] = env["WEIGHTFORMER_HF_CACHE"]
    try:
        from weightformer_hf import data, pool

        raw = data.load_raw_splits("mnist1d", mnist1d=TINY["mnist1d"])
        pool.resolve_pool(None, TINY, "tiny", raw, "mnist1d")  # builds the pool the runs share
    finally:
        os.environ.pop("WEIGHTFORMER_HF_CACHE")
    from accelerate.utils import write_basic_config

    write_basic_config(mixed_precision="no", save_location=str(root / "accelerate.json"))
    return {"root": root, "preset": str(preset), "env": env, "config": str(root / "accelerate.json")}


def run(tiny, *args, launch: list[str] | None = None, env=None, timeout=300) -> subprocess.CompletedProcess:
    cmd = [*(launch or [sys.executable]), SCRIPT, "--config", tiny["preset"], *map(str, args)]
    return subprocess.run(
        cmd, env=env or tiny["env"], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def run_in_process(tiny, monkeypatch, capsys, *args) -> tuple[int, str]:
    """`train.cli` in this process: a launch's code path without a new interpreter, whose imports cost about
    10 s per run on 2 cores. Returns the exit status and stderr; accelerate's process state is reset after."""
    import train
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("WEIGHTFORMER_HF_CACHE", tiny["env"]["WEIGHTFORMER_HF_CACHE"])
    capsys.readouterr()
    try:
        status = train.cli(["--config", tiny["preset"], *map(str, args)])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return status, capsys.readouterr().err


def accelerate_launch(tiny, *flags: str) -> list[str]:
    exe = str(Path(sys.executable).with_name("accelerate"))
    return [exe, "launch", "--config_file", tiny["config"], *flags]


def test_launch_writes_generator_and_eval_results(tiny, tmp_path):
    out = tmp_path / "out"
    proc = run(
        tiny, "--output_dir", out, "--finetune_steps", "3", "--with_tracking", "--report_to", "tensorboard",
        launch=accelerate_launch(tiny),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    # 2 held-out teachers and K = 2: one distinct set exists, and the report says one (it asked for 2)
    assert results["k"] == 2 and len(results["heldout_sets"]) == 1 and results["distinct_sets"] == 1
    for entry in results["heldout_sets"]:
        assert SET_KEYS <= entry.keys()
        assert len(entry["teachers"]) == 2 and entry["anchor"] in entry["teachers"]
        assert "finetuned_gain_recovered" in entry
    assert "mean_gain_recovered" in results and "mean_finetuned_gain_recovered" in results
    assert "| set | anchor |" in proc.stdout and "mean G over 1 distinct held-out set =" in proc.stdout
    assert "kd_anchor_1000 G" in proc.stdout and "mean_kd_anchor_1000_gain_recovered" in results
    # the student a user with validation data gets (`generate --anchor best`): the set's best teacher on the
    # meta split as anchor
    assert "best_val_anchor_student G" in proc.stdout and "mean_best_val_anchor_student_gain_recovered" in results
    for entry in results["heldout_sets"]:
        assert entry["best_val_anchor_student_accuracy"] > 0
    assert list(out.glob("**/events.out.tfevents.*"))  # the tracker received the figures

    from transformers import AutoModel

    import weightformer_hf  # noqa: F401  (registers WeightFormer with AutoModel)

    generator = AutoModel.from_pretrained(out)
    assert type(generator).__name__ == "WeightFormerModel"
    assert len(generator.config.training_pool) == 4  # 6 teachers, 2 held out
    assert generator.config.heldout_results["k"] == 2
    held_out = {t for e in results["heldout_sets"] for t in e["teachers"]}
    assert not held_out & set(results["train_teachers"])  # training and evaluation teachers never meet


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def _optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optimizer.bin", weights_only=False)["state"]


def test_resume_after_kill_continues_with_identical_state(tiny, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    # with validation teachers, so the best generator so far and the validation curve must survive the kill too
    flags = ["--max_train_steps", "60", "--checkpointing_steps", "4", "--num_heldout_sets", "1",
             "--num_val_teachers", "2", "--k_max", "2", "--eval_steps", "6"]  # fmt: skip
    full = tmp_path / "full"
    assert run(tiny, *flags, "--output_dir", full).returncode == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, SCRIPT, "--config", tiny["preset"], *flags, "--output_dir", str(killed)]
    proc = subprocess.Popen(cmd, env=tiny["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: (killed / "checkpoints" / "step_000004").exists(), proc)
    proc.kill()  # SIGKILL: no chance to save anything more
    proc.wait()
    saved = sorted(p.name for p in (killed / "checkpoints").glob("step_*"))
    assert saved and saved[-1] != "step_000060"
    start = int(saved[-1].split("_")[1])

    resumed = run(tiny, *flags, "--output_dir", killed, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {start}" in resumed.stdout
    final_a, final_b = full / "checkpoints" / "step_000060", killed / "checkpoints" / "step_000060"
    state_a, state_b = _optimizer_state(final_a), _optimizer_state(final_b)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_a[key][name], state_b[key][name]), (key, name)
    weights_a, weights_b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    results_a, results_b = (json.loads((d / "eval_results.json").read_text()) for d in (full, killed))
    curve = results_a["validation_curve"]
    assert [c[0] for c in curve] == list(range(0, 61, 6)) and results_b["validation_curve"] == curve
    assert results_a["kept_step"] == results_b["kept_step"] == min(curve, key=lambda c: c[1])[0]
    assert (final_a / "best_generator.safetensors").is_file()
    assert f"kept the generator of step {results_a['kept_step']}" in resumed.stdout
    # resuming with a flag that changes what the generator trains on is refused, and nothing is written
    before = sorted(p.name for p in (full / "checkpoints").iterdir())
    status, stderr = run_in_process(tiny, monkeypatch, capsys, *flags, "--val_data_fraction", "0.25",
                                    "--learning_rate", "0.0123", "--output_dir", full,
                                    "--resume_from_checkpoint", "latest")  # fmt: skip
    assert status == 2
    assert "the checkpoint was written with val_data_fraction=0.0 (now 0.25), meta_rows=510 (now 383)" in stderr
    # load_state would otherwise keep the saved learning rate without a word
    assert re.search(r"learning_rate=[0-9.e-]+ \(now 0\.0123\)", stderr), stderr[-2000:]
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == before


def test_validation_on_held_out_meta_rows_keeps_the_most_accurate_step(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    flags = ["--max_train_steps", "12", "--num_heldout_sets", "1", "--num_val_teachers", "2", "--k_max", "2",
             "--eval_steps", "3", "--val_data_fraction", "0.25", "--metric_for_best_model", "accuracy",
             "--kd_baseline_steps", "0"]  # fmt: skip
    result = run(tiny, *flags, "--checkpointing_steps", "4", "--output_dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000004", "step_000008", "step_000012"]
    results = json.loads((out / "eval_results.json").read_text())
    curve = results["validation_curve"]
    assert [c[0] for c in curve] == [0, 3, 6, 9, 12]
    assert results["kept_step"] == max(curve, key=lambda c: (c[2], -c[0]))[0]  # ties: the earlier step
    assert (results["metric_for_best_model"], results["val_data_fraction"]) == ("accuracy", 0.25)
    # a second run into the same folder would replace this one's generator, results and checkpoints
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    status, stderr = run_in_process(tiny, monkeypatch, capsys, *flags, "--output_dir", out)
    assert status == 2 and "already holds a run" in stderr and "--overwrite_output_dir" in stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == written
    assert f"kept the generator of step {results['kept_step']} (validation accuracy" in result.stdout
    # unless asked to: then the old run's checkpoints go first, so `latest` can only be one of the new run's
    replaced = run(tiny, *flags, "--max_train_steps", "6", "--checkpointing_steps", "5", "--overwrite_output_dir",
                   "--output_dir", out)  # fmt: skip
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000005"]
    assert [c[0] for c in json.loads((out / "eval_results.json").read_text())["validation_curve"]] == [0, 3, 6]


def test_sigterm_saves_a_checkpoint(tiny, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        SCRIPT,
        "--config",
        tiny["preset"],
        "--max_train_steps",
        "100000",
        "--online_augmentation",
        "--output_dir",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd, env=tiny["env"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    lines: list[str] = []

    def training_started() -> bool:
        lines.append(proc.stdout.readline())
        return "Running training" in lines[-1]

    _wait_for(training_started, proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "checkpoint saved at step" in rest
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "optimizer.bin").exists()
    assert int(checkpoints[0].name.split("_")[1]) > 0


def test_two_cpu_processes_average_the_loss_and_only_rank0_writes(tiny, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, audit = tmp_path / "out", tmp_path / "audit"
    audit.mkdir()
    site = os.pathsep.join([str(tiny["root"] / "site"), os.environ.get("PYTHONPATH", "")])
    env = {**tiny["env"], "PYTHONPATH": site, "WF_AUDIT_ROOT": str(out), "WF_AUDIT_LOG": str(audit)}
    launch = accelerate_launch(tiny, "--multi_gpu", "--num_processes", "2", "--main_process_port", str(port))
    proc = run(tiny, "--cpu", "--output_dir", out, "--max_train_steps", "4", "--logging_steps", "4",
               "--num_val_teachers", "2", "--k_max", "2", "--eval_steps", "2", launch=launch, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = re.findall(r"^\[rank (\d+)/(\d+)\] \d+ episodes, mean local loss ([\d.]+)$", proc.stdout, re.M)
    local = {int(rank): float(loss) for rank, _, loss in ranks}
    assert {world for _, world, _ in ranks} == {"2"}
    # both ranks ran; rank 0 prints both lines, in rank order, each on a line of its own
    assert [int(rank) for rank, _, _ in ranks] == [0, 1], proc.stdout
    logged = [line for line in proc.stdout.splitlines() if line.startswith("step 4: loss")]
    assert len(logged) == 1 and "mean over 2 process(es)" in logged[0]  # printed by rank 0 only
    assert float(logged[0].split()[3]) == pytest.approx((local[0] + local[1]) / 2, rel=1e-5)
    assert local[0] != local[1]  # the ranks drew different episodes and batches
    assert (out / "eval_results.json").exists() and (out / "model.safetensors").exists()
    # the ranks score their shares of the validation sets; rank 0 reports the sums once per check
    checks = re.findall(r"^step (\d+): validation loss ([\d.]+)", proc.stdout, re.M)
    curve = json.loads((out / "eval_results.json").read_text())["validation_curve"]
    assert [int(s) for s, _ in checks] == [c[0] for c in curve] == [0, 2, 4]
    assert [float(v) for _, v in checks] == pytest.approx([c[1] for c in curve], abs=1e-6)
    rank0, rank1 = (audit / "rank0.txt").read_text().split(), (audit / "rank1.txt").read_text().split()
    assert any(p.endswith("eval_results.json") for p in rank0)
    assert rank1 == []


def _save_mixed_pool(folder: Path) -> None:
    from weightformer_hf.reference_models import (
        Conv1dClassifier,
        Conv1dClassifierConfig,
        MLPClassifier,
        MLPClassifierConfig,
    )

    labels = {i: str(i) for i in range(10)}
    MLPClassifier(MLPClassifierConfig(hidden_sizes=(32, 32), id2label=labels)).save_pretrained(
        folder / "a-mlp"
    )
    MLPClassifier(MLPClassifierConfig(hidden_sizes=(32, 32), id2label=labels)).save_pretrained(
        folder / "b-mlp"
    )
    Conv1dClassifier(Conv1dClassifierConfig(channels=(8, 8), id2label=labels)).save_pretrained(
        folder / "c-cnn"
    )


def _save_image_folder(folder: Path) -> None:
    from PIL import Image

    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / cls / f"{i}.png")


def test_timm_teachers_train_on_an_image_folder_whose_classes_are_in_another_order(tiny, tmp_path):
    """The image path end to end: timm teachers from local folders and an imagefolder, whose classes are
    listed alphabetically, not in the teachers' order (refused before the dataset was renumbered)."""
    import numpy as np
    from conftest import save_timm, tiny_timm
    from PIL import Image

    labels = ["emu", "cat", "dog"]
    teachers = [str(save_timm(tiny_timm(i, labels=labels), tmp_path / f"t{i}", labels=labels)) for i in range(5)]
    rng = np.random.default_rng(0)
    for name in labels:
        (tmp_path / "images" / name).mkdir(parents=True)
        for j in range(40):
            image = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L")
            image.save(tmp_path / "images" / name / f"{j}.png")
    keys = ("generator", "k_min", "alpha", "temperature", "lr_scheduler_type", "weight_decay", "max_grad_norm",
            "learning_rate", "num_warmup_steps", "num_eval_teachers", "eval_k")  # fmt: skip
    preset = {**{k: TINY[k] for k in keys}, "k_max": 2, "num_heldout_sets": 1, "max_train_steps": 2,
              "per_device_train_batch_size": 4}  # fmt: skip
    (tmp_path / "images.json").write_text(json.dumps(preset))
    cmd = [sys.executable, SCRIPT, "--config", str(tmp_path / "images.json"), "--teachers", *teachers,
           "--train_dir", str(tmp_path / "images"), "--kd_baseline_steps", "2", "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=tiny["env"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "renumbered the dataset's labels to the teachers' order: ['emu', 'cat', 'dog']" in proc.stdout
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert len(results["heldout_sets"]) == 1 and SET_KEYS <= results["heldout_sets"][0].keys()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["student"]["label_names"] == labels  # the generator serves the teachers' numbering


@pytest.mark.parametrize(
    "case, expected",
    [
        ("mixed", "all teachers must share one architecture"),
        ("empty", "the pool is empty"),
        ("k_too_large", "K is larger than the pool"),
        ("no_label_column", "has no label column 'fine_label'"),
        ("batch_too_large", "--per_device_train_batch_size 1024 leaves fewer full batches than processes"),
        ("one_validation_teacher", "--num_val_teachers needs at least 2 validation teachers"),
        ("validation_leaves_too_few", "k_max=3 but only 2 training teachers (6 in the pool, 2 held out for "
                                      "evaluation, 2 kept for validation)"),
        ("val_rows_without_val_teachers", "--val_data_fraction keeps meta rows for validation teachers: set "
                                          "--num_val_teachers"),
        ("val_rows_leave_too_few", "--per_device_train_batch_size 400 leaves fewer full batches than processes: "
                                   "the generator trains on 383 meta examples"),
    ],
)
def test_bad_input_gives_one_message_and_exit_status_2(tiny, tmp_path, monkeypatch, capsys, case, expected):
    if case == "mixed":
        _save_mixed_pool(tmp_path / "pool")
        args = ["--teachers", tmp_path / "pool"]
    elif case == "empty":
        (tmp_path / "pool").mkdir()
        args = ["--teachers", tmp_path / "pool"]
    elif case == "k_too_large":
        args = ["--k_max", "5"]  # 6 teachers, 2 held out: 4 to train on
    elif case == "one_validation_teacher":
        args = ["--num_val_teachers", "1", "--k_max", "2"]
    elif case == "validation_leaves_too_few":
        args = ["--num_val_teachers", "2"]  # 4 training teachers, 2 validate: 2 left for k_max 3
    elif case == "val_rows_without_val_teachers":
        args = ["--val_data_fraction", "0.25"]
    elif case == "val_rows_leave_too_few":  # 510 meta examples, 127 kept for validation
        args = ["--num_val_teachers", "2", "--k_max", "2", "--val_data_fraction", "0.25",
                "--per_device_train_batch_size", "400"]  # fmt: skip
    elif case == "batch_too_large":
        args = ["--per_device_train_batch_size", "1024"]  # the tiny meta split has 512 examples
    else:
        _save_image_folder(tmp_path / "images")
        args = ["--train_dir", tmp_path / "images", "--label_column_name", "fine_label"]
    status, stderr = run_in_process(tiny, monkeypatch, capsys, *args, "--output_dir", tmp_path / "out")
    assert status == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and expected in errors[0], stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_bad_input_from_a_real_launch_is_one_line_and_exit_status_2(tiny, tmp_path):
    """The cases above run `train.cli` in-process; this one is the script as a user starts it."""
    _save_mixed_pool(tmp_path / "pool")
    proc = run(tiny, "--teachers", tmp_path / "pool", "--output_dir", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and "all teachers must share one architecture" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_presets_load_and_name_the_issue_settings():
    from weightformer_hf.hub_configs import load_preset, preset_names

    required = {"mnist1d-mlp", "mnist1d-mlp-finetune", "mnist1d-cnn", "mnist-resnet-tiny", "cifar10-resnet18",
                "cifar10-vit-tiny", "cifar10-vgg11", "cifar100-resnet50", "cifar10-vit-b32"}  # fmt: skip
    assert required <= set(preset_names())
    for name in required:
        preset = load_preset(name)
        assert preset["temperature"] > 1  # the distillation signal needs room (measured-baselines.md)
        training = preset["pool"]["num_teachers"] - preset["num_eval_teachers"] - preset.get("num_val_teachers", 0)
        assert preset["k_max"] <= training, name
        if "mnist1d" in preset:  # one full batch of the meta split per episode, at least
            assert preset["per_device_train_batch_size"] <= preset["mnist1d"]["meta_samples"], name


def test_the_default_run_is_the_finetune_preset_and_writes_under_its_name():
    import train

    args = train.parse_args([])
    assert args.preset_name == "mnist1d-mlp-finetune" and args.preset["pool"]["regime"] == "finetune"
    assert args.output_dir == "outputs/weightformer-mnist1d-mlp-finetune"
    assert train.parse_args(["--config", "mnist1d-mlp"]).output_dir == "outputs/weightformer-mnist1d-mlp"
    assert train.parse_args(["--output_dir", "x"]).output_dir == "x"


def test_kd_loss_and_episode_sampling():
    import random

    from weightformer_hf import training

    logits = torch.randn(3, 8, 10)
    labels = torch.randint(0, 10, (8,))
    ensemble_mean = torch.log(torch.softmax(logits / 4, -1).mean(0)) * 4  # a student matching the ensemble
    assert training.kd_loss(ensemble_mean, logits, labels, alpha=1.0, temperature=4.0).abs() < 1e-5
    assert training.kd_loss(torch.zeros(8, 10), logits, labels, 1.0, 4.0) > 0
    members, anchor = training.sample_episode(random.Random(0), 10, 2, 6)
    assert 2 <= len(members) <= 6 and len(set(members)) == len(members) and 0 <= anchor < len(members)
    train, held = training.split_pool(10, 3)
    assert not set(train) & set(held) and len(held) == 3
    with pytest.raises(training.PoolConfigError, match="K is larger than the pool"):
        training.check_k(7, 3, 2, 8, 2)


def test_heldout_sets_are_distinct_and_disjoint_first():
    from weightformer_hf import training

    sets = training.heldout_sets(list(range(10, 22)), 4, 5, seed=3)
    members = [tuple(m) for m, _ in sets]
    assert len(sets) == 5 and len(set(members)) == 5  # 12 teachers: 3 disjoint sets, then 2 overlapping ones
    first = [t for m in members[:3] for t in m]
    assert sorted(first) == list(range(10, 22))
    assert all(0 <= a < 4 for _, a in sets)
    assert len(training.heldout_sets([0, 1, 2, 3], 4, 3)) == 1  # only one set of 4 exists among 4 teachers
    assert len(training.heldout_sets([0, 1, 2], 2, 10)) == 3  # comb(3, 2)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "0"], "--temperature must be a positive number, got 0.0"),
        (["--alpha", "1.5"], "--alpha (the KD weight; CE gets 1 - alpha) must be in [0, 1], got 1.5"),
        (["--learning_rate", "-1"], "--learning_rate must be a positive number, got -1.0"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1, got 0"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1, got 0"),
        (["--max_train_steps", "-3"], "--max_train_steps must be at least 0, got -3"),
        (["--lr_scheduler_type", "cosyne"], "--lr_scheduler_type 'cosyne' is not one of linear, cosine"),
        (["--with_tracking", "--report_to", "tensorbored"], "--report_to tensorbored: not a tracker"),
        (["--cpu_threads", "0"], "--cpu_threads must be at least 1, got 0"),
    ],
)
def test_flag_values_that_cannot_work_are_refused_up_front(flags, message, capsys):
    import train

    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_plain_launch_on_cpu_gets_the_cores_that_launch_cpu_would(monkeypatch):
    """`accelerate launch` without `--cpu` sets OMP_NUM_THREADS=1; on a CPU the script then takes accelerate's own
    `--cpu` count, the physical cores per local process, unless `--cpu_threads` says otherwise."""
    import psutil
    import train

    cpu = torch.device("cpu")
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8 if logical else 4)  # 4 cores, 8 hyperthreads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert train.cpu_threads(cpu, None, 1) == 4
    assert train.cpu_threads(cpu, None, 2) == 2  # two local processes share the cores
    assert train.cpu_threads(cpu, None, 4) is None  # one core each: what the launch set
    assert train.cpu_threads(cpu, 1, 1) == 1 and train.cpu_threads(cpu, 3, 1) == 3  # --cpu_threads wins
    assert train.cpu_threads(torch.device("cuda"), None, 1) is None  # the GPU trains
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a count the user chose
    assert train.cpu_threads(cpu, None, 1) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # `accelerate launch --cpu` already set the count
    assert train.cpu_threads(cpu, None, 1) is None
    monkeypatch.delenv("ACCELERATE_USE_CPU")  # `python examples/train.py`: the user's own setting
    assert train.cpu_threads(cpu, None, 1) is None


def test_preset_files_that_cannot_work_are_refused_naming_the_key(tmp_path, capsys):
    import train

    cases = {
        "bad.json": ('{"k_min": 2,', "is not valid JSON"),
        "list.json": ("[1, 2]", "must be a JSON object of settings, not a list"),
        "typo.json": (json.dumps({**TINY, "lerning_rate": 0.1}), "unknown top-level key(s) 'lerning_rate' (did you "
                                                                  "mean 'learning_rate'?)"),
        "gen.json": (json.dumps({**TINY, "generator": {"hidden_szie": 8}}), "unknown generator key(s) 'hidden_szie'"),
        "pool.json": (json.dumps({**TINY, "pool": {**TINY["pool"], "num_teacher": 3}}), "unknown pool key(s)"),
        "gen_list.json": (json.dumps({**TINY, "generator": [1]}), "'generator' must be a JSON object"),
        "short.json": (json.dumps({k: v for k, v in TINY.items() if k not in ("weight_decay", "max_train_steps")}),
                       "preset 'short' sets no --weight_decay, --max_train_steps (or --num_train_epochs): add them"),
    }  # fmt: skip
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(["--config", str(tmp_path / name)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, name
    (tmp_path / "ok.json").write_text(json.dumps(TINY))
    assert train.parse_args(["--config", str(tmp_path / "ok.json")]).k_max == TINY["k_max"]
    short = ["--config", str(tmp_path / "short.json"), "--weight_decay", "0", "--num_train_epochs", "1"]
    assert train.parse_args(short).weight_decay == 0  # the command line may give what the preset lacks


def test_output_dir_holding_a_run_or_a_model_is_not_overwritten_unless_asked(tmp_path):
    import train

    from weightformer_hf import WeightFormerError

    train.check_output_dir(str(tmp_path / "new"), resume=False, overwrite=False)  # absent or empty: fine
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(WeightFormerError, match=r"already holds a run or a model \(model.safetensors\)"):
        train.check_output_dir(str(tmp_path / "teacher"), resume=False, overwrite=False)
    train.check_output_dir(str(tmp_path / "teacher"), resume=True, overwrite=False)
    train.check_output_dir(str(tmp_path / "teacher"), resume=False, overwrite=True)


def test_resuming_from_a_folder_that_is_no_checkpoint_is_named(tmp_path):
    import train

    from weightformer_hf import WeightFormerError

    with pytest.raises(WeightFormerError, match="no such checkpoint folder"):
        train.load_checkpoint(None, tmp_path / "absent")
    (tmp_path / "emptied").mkdir()
    with pytest.raises(WeightFormerError, match="is not a checkpoint of this script: it lacks model.safetensors, "
                                                "optimizer.bin"):  # fmt: skip
        train.load_checkpoint(None, tmp_path / "emptied")


@pytest.fixture(scope="module")
def untrained_run(tiny, tmp_path_factory) -> dict:
    """A run whose generator never trains (every student is its anchor), with 7 KD steps both from the
    anchor (`kd_anchor_7`) and from the generated student (`--finetune_steps 7`)."""
    out = tmp_path_factory.mktemp("untrained") / "out"
    proc = run(tiny, "--output_dir", out, "--max_train_steps", "0", "--kd_baseline_steps", "7",
               "--finetune_steps", "7")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "eval_results.json").read_text())


def test_finetuning_the_student_is_the_kd_baseline_from_the_generated_student(untrained_run):
    """`--finetune_steps N` runs `kd_anchor_N`'s KD (`weightformer generate --finetune-steps`): from an
    untrained generator's student, which is the anchor, the two give the same model on every set."""
    sets = untrained_run["heldout_sets"]
    assert len(sets) == 1  # 2 held-out teachers at K = 2: one distinct set
    for entry in sets:
        assert entry["student_accuracy"] == entry["anchor_accuracy"]
        assert entry["finetuned_student_nll"] == entry["kd_anchor_7_nll"]
        assert entry["finetuned_student_accuracy"] == entry["kd_anchor_7_accuracy"]
        assert entry["finetuned_student_nll"] != entry["student_nll"]  # the 7 steps did something


def test_the_best_val_anchor_student_of_an_untrained_generator_is_the_sets_best_teacher_on_the_meta_split(
    tiny, untrained_run
):
    from weightformer_hf import data, pool
    from weightformer_hf.hub import load_teachers

    results = untrained_run
    os.environ["WEIGHTFORMER_HF_CACHE"] = tiny["env"]["WEIGHTFORMER_HF_CACHE"]
    try:
        raw = data.load_raw_splits("mnist1d", mnist1d=TINY["mnist1d"])
        folders = {p.name: p for p in pool.teacher_paths(pool.default_pool_dir("tiny"))}
    finally:
        os.environ.pop("WEIGHTFORMER_HF_CACHE")
    meta_x, meta_y = data.tensors(data.task_splits(raw, data.signal_transform())["meta"])
    chosen = []
    for entry in results["heldout_sets"]:
        members = load_teachers([str(folders[Path(t).name]) for t in entry["teachers"]])
        with torch.no_grad():
            correct = [(members.model(j)(meta_x).logits.argmax(-1) == meta_y).float().mean() for j in range(2)]
        best = max(range(2), key=lambda j: (correct[j], -j))
        assert entry["best_val_anchor_student_accuracy"] == entry["single_accuracies"][best]
        chosen.append((entry["teachers"][best], entry["anchor"], entry["single_accuracies"]))
    # the check can tell: the best teacher is not the random anchor, and their test accuracies differ
    assert any(b != a and acc[0] != acc[1] for b, a, acc in chosen), chosen


def test_resuming_from_a_truncated_checkpoint_is_named(tmp_path):
    import train
    from accelerate import Accelerator

    from weightformer_hf import WeightFormerError

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.save_state(str(tmp_path / "step_000001"))
    weights = tmp_path / "step_000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(WeightFormerError, match=r"cannot resume from '.*step_000001': .*\(a truncated checkpoint"):
        train.load_checkpoint(accelerator, tmp_path / "step_000001")
