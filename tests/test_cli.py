"""The `weightformer` command line and the `generate()` function it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_timm
from huggingface_hub import ModelCard
from test_push import TOKEN, HubRecorder

from weightformer_hf import WeightFormerModel
from weightformer_hf.cli import main
from weightformer_hf.generate import generate
from weightformer_hf.hub import load_teachers


def _run(capsys, *argv):
    capsys.readouterr()  # drop what the test's own setup printed
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_version_families_and_help(capsys):
    code, out, _ = _run(capsys, "families")
    assert code == 0 and "timm_resnet" in out and "hf_vit" in out
    for argv in (
        ["--version"],
        ["--help"],
        ["generate", "--help"],
        ["evaluate", "--help"],
        ["families", "--help"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "weightformer_hf 0.1.0" in out and "--push-to-hub" in out and "--dataset" in out


def test_generate_untrained_student_equals_anchor(timm_repos, tmp_path, capsys):
    import timm

    out_dir = tmp_path / "student"
    code, out, err = _run(
        capsys,
        "generate",
        "--generator",
        "none",
        "--teachers",
        *timm_repos.ids,
        "--anchor",
        "1",
        "--out",
        str(out_dir),
    )
    assert code == 0, err
    assert "%|" not in err  # no progress bar when stderr is not a terminal
    assert timm_repos.shas[0] in out
    student = timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
    assert _same_weights(student, timm_repos.models[1])
    card = ModelCard.load(out_dir / "README.md")
    assert card.data.base_model == timm_repos.ids and "untrained" in card.text


def test_generate_warns_about_a_teacher_given_twice(timm_repos, tmp_path, capsys):
    first = timm_repos.ids[0]
    code, out, err = _run(capsys, "generate", "--generator", "none", "--teachers", first, timm_repos.ids[1], first,
                          "--out", str(tmp_path / "s"))  # fmt: skip
    assert code == 0, err
    assert f"warning: teachers {first!r} and {first!r} are the same model" in err
    code, out, err = _run(capsys, "generate", "--generator", "none", "--teachers", *timm_repos.ids[:2],
                          "--out", str(tmp_path / "t"))  # fmt: skip
    assert code == 0 and "same model" not in err


def test_generate_function_matches_cli(timm_repos, tmp_path, capsys):
    from safetensors.torch import load_file

    result = generate(timm_repos.ids[:2], generator="none", anchor=0, out_dir=tmp_path / "s", progress=False)
    assert _same_weights(result.student, timm_repos.models[0])
    assert result.out_dir == tmp_path / "s" and (result.out_dir / "model.safetensors").is_file()
    assert [i.revision for i in result.teachers.infos] == timm_repos.shas[:2]
    code, _, err = _run(capsys, "generate", "--generator", "none", "--teachers", *timm_repos.ids[:2], "--anchor", "0",
                        "--out", str(tmp_path / "c"))  # fmt: skip
    assert code == 0, err
    by_function, by_cli = (load_file(tmp_path / d / "model.safetensors") for d in ("s", "c"))
    assert by_function.keys() == by_cli.keys() and all(torch.equal(by_function[k], by_cli[k]) for k in by_cli)
    assert ModelCard.load(tmp_path / "s" / "README.md").data == ModelCard.load(tmp_path / "c" / "README.md").data


def test_generate_with_a_generator_from_the_hub(hub, timm_repos, tmp_path, capsys):
    import timm
    from families import perturb

    teachers = load_teachers(timm_repos.ids)
    generator = WeightFormerModel.for_teachers(teachers, hidden_size=16, intermediate_size=32)
    perturb(generator)  # a generator that changes the anchor, so the student shows its weights were used
    generator.save_pretrained(tmp_path / "g")
    sha = hub.add_repo("testorg/generator", tmp_path / "g")
    out_dir = tmp_path / "student"
    code, _, err = _run(
        capsys,
        "generate",
        "--generator",
        "testorg/generator",
        "--teachers",
        *timm_repos.ids,
        "--out",
        str(out_dir),
    )
    assert code == 0, err
    card = ModelCard.load(out_dir / "README.md")
    assert f"`testorg/generator` at commit `{sha}`" in card.text
    student = timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
    assert _same_weights(student, generator.generate_student(teachers, anchor=0))
    assert not _same_weights(student, timm_repos.models[0])


def test_generate_refuses_teachers_the_generator_does_not_serve(hf_repos, timm_repos, tmp_path, capsys):
    teachers = load_teachers(timm_repos.ids[:1])
    WeightFormerModel.for_teachers(teachers, hidden_size=16, intermediate_size=32).save_pretrained(
        tmp_path / "g"
    )
    resnets = hf_repos["resnet"].ids
    code, out, err = _run(
        capsys,
        "generate",
        "--generator",
        str(tmp_path / "g"),
        "--teachers",
        *resnets,
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert "timm_resnet" in err and "testorg/hf-resnet-a" in err and "hf_resnet" in err


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (["--teachers", "testorg/missing-teacher"], "'testorg/missing-teacher'"),
        (["--teachers", "testorg/timm-a", "--anchor", "5"], "anchor 5"),
        (["--teachers", "testorg/hf-resnet-a", "--format", "timm"], "--format transformers"),
        (["--teachers", "testorg/timm-a", "--bogus-flag"], "--bogus-flag"),
        (["--teachers", "testorg/timm-a", "--format", "onnx"], "'onnx'"),
    ],
)
def test_bad_input_exits_2_with_one_line(hub, timm_repos, hf_repos, tmp_path, capsys, argv, culprit):
    code, out, err = _run(capsys, "generate", "--generator", "none", "--out", str(tmp_path / "o"), *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and culprit in err, err


def test_generate_and_push_never_prints_the_token(timm_repos, tmp_path, capsys, caplog):
    caplog.set_level("DEBUG")
    with HubRecorder() as recorder:
        code, out, err = _run(
            capsys,
            "generate",
            "--generator",
            "none",
            "--teachers",
            *timm_repos.ids[:2],
            "--out",
            str(tmp_path / "s"),
            "--push-to-hub",
            "org/student",
            "--token",
            TOKEN,
            "--private",
        )
    assert code == 0, err
    (upload,) = recorder.uploads
    assert upload["repo_id"] == "org/student" and recorder.repos[0]["private"] is True
    assert {"README.md", "config.json", "model.safetensors"} <= set(upload["files"])
    assert "pushed:" in out
    assert TOKEN not in out + err + caplog.text


@pytest.fixture
def mlp_folders(tmp_path):
    from weightformer_hf.reference_models import MLPClassifier, MLPClassifierConfig

    folders = []
    for i in range(2):
        torch.manual_seed(i)
        MLPClassifier(MLPClassifierConfig(hidden_sizes=[16])).save_pretrained(tmp_path / f"mlp{i}")
        folders.append(str(tmp_path / f"mlp{i}"))
    return folders


def test_evaluate_teachers_and_student_on_mnist1d(mlp_folders, tmp_path, capsys):
    code, out, err = _run(
        capsys,
        "evaluate",
        "--teachers",
        *mlp_folders,
        "--dataset",
        "mnist1d",
        "--num-samples",
        "64",
        "--json",
    )
    assert code == 0, err
    results = json.loads(out)
    assert set(results) == {*mlp_folders, "ensemble"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results.values())
    student = tmp_path / "student"
    assert (
        _run(
            capsys,
            "generate",
            "--generator",
            "none",
            "--teachers",
            *mlp_folders,
            "--out",
            str(student),
            "--quiet",
        )[0]
        == 0
    )
    code, out, _ = _run(
        capsys, "evaluate", "--model", str(student), "--dataset", "mnist1d", "--num-samples", "64"
    )
    assert code == 0 and "accuracy" in out
    # the untrained student is teacher 0: same numbers
    assert f"{results[mlp_folders[0]]['accuracy']:8.4f}" in out


def test_generate_anchor_best_picks_the_most_accurate_teacher(tmp_path, capsys):
    """`--anchor best` keeps the teacher that `evaluate` measures as most accurate on the anchor data (here the
    only trained one, not the first), records that choice in the card and provenance, and says so."""
    import torch.nn.functional as F
    from mnist1d.data import get_dataset_args, make_dataset

    from weightformer_hf.reference_models import MLPClassifier, MLPClassifierConfig

    args = get_dataset_args()
    args.num_samples, args.seed = 2000, 7
    data = make_dataset(args)
    x, y = torch.as_tensor(data["x"], dtype=torch.float32), torch.as_tensor(data["y"], dtype=torch.long)
    folders, models = [], []
    for i in range(3):
        torch.manual_seed(i)
        model = MLPClassifier(MLPClassifierConfig(hidden_sizes=[16]))
        if i == 1:
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            for _ in range(150):
                loss = F.cross_entropy(model(x).logits, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.save_pretrained(tmp_path / f"mlp{i}")
        folders.append(str(tmp_path / f"mlp{i}"))
        models.append(model)
    common = ["--dataset", "mnist1d", "--num-samples", "500", "--seed", "1", "--json"]
    code, out, err = _run(capsys, "evaluate", "--teachers", *folders, *common)
    assert code == 0, err
    measured = [json.loads(out)[f]["accuracy"] for f in folders]
    assert max(range(3), key=lambda i: measured[i]) == 1
    student = tmp_path / "student"
    code, out, err = _run(capsys, "generate", "--generator", "none", "--teachers", *folders, "--out", str(student),
                          "--anchor", "best", "--anchor-dataset", "mnist1d", "--anchor-num-samples", "500")  # fmt: skip
    assert code == 0, err
    assert "anchor: teacher 1, the most accurate on mnist1d, seed 1, 500 samples" in out
    # the untrained generator's student is its anchor: the same accuracy on the same data
    assert f"student accuracy on the same data: {measured[1]:.4f} (anchor {measured[1]:.4f})" in out
    provenance = json.loads((student / "weightformer_config.json").read_text())
    assert provenance["anchor"] == 1 and provenance["anchor_choice"]["accuracies"] == measured
    assert provenance["anchor_choice"]["student_accuracy"] == measured[1]
    card = ModelCard.load(student / "README.md").text
    assert "teacher 1" in card and "labelled data only chose the anchor" in card
    assert "no training data was used" not in card
    result = generate(folders, generator="none", anchor="best", anchor_dataset="mnist1d", anchor_num_samples=500)
    assert result.anchor == 1 and _same_weights(result.student, models[1])


def test_generate_finetune_distils_the_student_as_kd_anchor_does(mlp_folders, tmp_path, capsys):
    """`--finetune-steps N --finetune-dataset D`: the saved student is the generated one after exactly the
    benchmark's KD recipe (`baselines.kd_anchor`) on the teachers' ensemble over D, and says so."""
    import copy

    from safetensors.torch import load_file

    from weightformer_hf import baselines
    from weightformer_hf.evaluation import predict_logits
    from weightformer_hf.scoring import evaluation_data

    student = tmp_path / "student"
    code, out, err = _run(capsys, "generate", "--generator", "none", "--teachers", *mlp_folders, "--anchor", "1",
                          "--out", str(student), "--finetune-steps", "25", "--finetune-dataset", "mnist1d",
                          "--finetune-num-samples", "300")  # fmt: skip
    assert code == 0, err
    assert "fine-tuned: 25 KD steps on mnist1d, seed 2, 300 samples" in out
    teachers = load_teachers(mlp_folders)
    inputs, labels = evaluation_data(teachers, "mnist1d", "train", 300, 2, "image", "label")
    models = [teachers.model(i) for i in range(len(teachers))]
    logits = torch.stack([predict_logits(lambda x, m=m: teachers.family.logits(m, x), inputs, 256) for m in models])
    expected = baselines.kd_anchor(copy.deepcopy(teachers.model(1)), inputs, labels, logits, steps=25,
                                   learning_rate=3e-4, batch_size=256, temperature=4.0, alpha=0.3, seed=2)  # fmt: skip
    saved = load_file(student / "model.safetensors")
    assert saved.keys() == expected.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in expected.state_dict().items())
    assert not _same_weights(expected, teachers.model(1))  # the steps changed something
    provenance = json.loads((student / "weightformer_config.json").read_text())["finetuning"]
    assert {k: provenance[k] for k in ("steps", "data", "learning_rate", "alpha", "batch_size")} == {
        "steps": 25, "data": "mnist1d, seed 2, 300 samples", "learning_rate": 3e-4, "alpha": 0.3, "batch_size": 256
    }  # fmt: skip
    card = ModelCard.load(student / "README.md").text
    assert "distilled on the teachers' ensemble for 25 steps" in card and "no training data was used" not in card


def test_finetune_request_values_from_python():
    import numpy as np

    from weightformer_hf.distill import check_finetune_request
    from weightformer_hf.errors import WeightFormerError

    check_finetune_request(np.int64(5), "mnist1d", 1e-3, torch.tensor(3))  # integers of any library
    check_finetune_request(0, None, 3e-4)  # off
    for steps, samples in ((1.5, 10), (True, 10), (5, 0), (5, 2.0)):
        with pytest.raises(WeightFormerError, match="must be a whole number"):
            check_finetune_request(steps, "mnist1d", 1e-3, samples)


def test_generate_finetune_refuses_overflowing_teachers_and_a_diverging_student(mlp_folders, tmp_path, capsys):
    """Teachers whose finite weights overflow on the data give no target (named, before generation); a learning
    rate that sends the student to inf is named and nothing is saved."""
    from safetensors.torch import load_file, save_file

    huge = tmp_path / "huge"
    import shutil

    shutil.copytree(mlp_folders[1], huge)
    state = load_file(huge / "model.safetensors")
    save_file({k: v * 1e20 if k.endswith("weight") else v for k, v in state.items()}, huge / "model.safetensors")
    out_dir = tmp_path / "student"
    common = ["generate", "--generator", "none", "--out", str(out_dir), "--finetune-dataset", "mnist1d",
              "--finetune-num-samples", "256"]  # fmt: skip
    code, _, err = _run(capsys, *common, "--teachers", mlp_folders[0], str(huge), "--finetune-steps", "2")
    assert code == 2 and f"teacher {str(huge)!r} gives NaN or inf logits on" in err, err
    code, _, err = _run(capsys, *common, "--teachers", *mlp_folders, "--finetune-steps", "5",
                        "--finetune-learning-rate", "1e30")  # fmt: skip
    assert code == 2 and "fine-tuning made the student's" in err and "NaN or infinite" in err, err
    assert err.count("\n") == 1
    code, _, err = _run(capsys, *common, "--teachers", *mlp_folders, "--finetune-steps", "5",
                        "--finetune-learning-rate", "1e38")  # fmt: skip  (AdamW's own step overflows in torch)
    assert code == 2 and "fine-tuning failed at learning rate 1e+38" in err and err.count("\n") == 1, err
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--finetune-steps", "10"], "needs labelled data"),
        (["--finetune-dataset", "mnist1d"], "only with --finetune-steps"),
        (["--finetune-steps", "-1", "--finetune-dataset", "mnist1d"], "must be a whole number ≥ 0"),
        (["--finetune-steps", "5", "--finetune-dataset", "mnist1d", "--finetune-learning-rate", "0"], "positive"),
        (["--finetune-steps", "5", "--finetune-dataset", "mnist1d", "--finetune-learning-rate", "nan"], "positive"),
        (["--finetune-steps", "5", "--finetune-dataset", "org/images"], "evaluate them with --dataset mnist1d"),
    ],
)
def test_generate_finetune_requests_that_cannot_work(mlp_folders, tmp_path, capsys, monkeypatch, flags, message):
    """Each is refused before anything is generated (data that cannot be read included), and nothing is written."""
    generated = []
    monkeypatch.setattr(WeightFormerModel, "generate_student", lambda *a, **k: generated.append(1))
    out_dir = tmp_path / "student"
    code, _, err = _run(capsys, "generate", "--generator", "none", "--teachers", *mlp_folders, "--out",
                        str(out_dir), *flags)  # fmt: skip
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out_dir.exists() and generated == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--anchor", "best"], "needs a dataset"),
        (["--anchor", "2", "--anchor-dataset", "mnist1d"], "pass anchor 'best'"),
        (["--anchor", "first"], "neither a teacher index nor 'best'"),
    ],
)
def test_generate_anchor_requests_that_cannot_work(mlp_folders, tmp_path, capsys, flags, message):
    out_dir = tmp_path / "student"
    code, _, err = _run(capsys, "generate", "--generator", "none", "--teachers", *mlp_folders, "--out",
                        str(out_dir), *flags)  # fmt: skip
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out_dir.exists()


def test_evaluate_image_models_on_mnist1d_is_refused(timm_repos, capsys):
    code, _, err = _run(capsys, "evaluate", "--model", timm_repos.ids[0], "--dataset", "mnist1d")
    assert code == 2 and "timm_resnet" in err and "mnist1d" in err


def test_console_script_exit_status(tmp_path):
    script = [sys.executable, "-c", "import sys; from weightformer_hf.cli import main; sys.exit(main())"]
    done = subprocess.run(
        [*script, "generate", "--generator", "none", "--teachers", str(tmp_path / "absent"), "--out", "o"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip().count("\n") == 0 and "absent" in done.stderr and "folder not found" in done.stderr
    )


def test_evaluate_timm_model_on_an_image_folder(timm_repos, tmp_path, capsys):
    """The image-dataset path: an imagefolder with one folder per class name, labels mapped by name, the
    model's own timm transform; accuracy equals a hand-run of the model on the same images."""
    import numpy as np
    from conftest import LABELS
    from PIL import Image
    from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
    from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
    from timm.data import create_transform

    rng = np.random.default_rng(0)
    images = []
    for name in reversed(LABELS):  # folder order differs from the model's label order
        (tmp_path / "images" / name).mkdir(parents=True)
        for j in range(2):
            image = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L")
            image.save(tmp_path / "images" / name / f"{j}.png")
            images.append((image, LABELS.index(name)))
    model = timm_repos.models[0]
    # resnet10t's default eval transform, for the model's one input channel (mean/std averaged over RGB)
    mean, std = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    transform = create_transform(input_size=(1, 176, 176), interpolation="bicubic", crop_pct=0.875,
                                 crop_mode="center", mean=mean, std=std)  # fmt: skip
    with torch.no_grad():
        preds = [int(model(transform(im.convert("L"))[None]).argmax()) for im, _ in images]
    expected = sum(p == y for p, (_, y) in zip(preds, images)) / len(images)
    code, out, err = _run(capsys, "evaluate", "--model", timm_repos.ids[0], "--dataset", str(tmp_path / "images"),
                          "--split", "train", "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)[timm_repos.ids[0]]
    assert result["accuracy"] == pytest.approx(expected, abs=1e-6)  # fp32 mean
    # the same data distils a timm student (--finetune-steps): it trains, and timm loads the result
    student = tmp_path / "student"
    code, out, err = _run(capsys, "generate", "--generator", "none", "--teachers", *timm_repos.ids[:2], "--out",
                          str(student), "--finetune-steps", "2", "--finetune-dataset",
                          str(tmp_path / "images"))  # fmt: skip
    assert code == 0, err
    assert f"fine-tuned: 2 KD steps on {tmp_path / 'images'}, split train, 6 samples" in out
    import timm

    loaded = timm.create_model(f"local-dir:{student}", pretrained=True)
    assert not _same_weights(loaded, model)
    code, _, err = _run(capsys, "evaluate", "--model", timm_repos.ids[0], "--dataset", str(tmp_path / "images"),
                        "--split", "train", "--label-column", "fine_label")  # fmt: skip
    assert code == 2 and "fine_label" in err


def test_generate_never_writes_over_a_folder_that_is_not_a_student(timm_repos, tmp_path, capsys, monkeypatch):
    """A folder with other files, a teacher's folder, a file, an empty path or a folder inside one that is not
    writable: exit 2, nothing written or lost. A previous student's folder may be written again, and a save
    leaves no staging folder behind."""
    import os

    from safetensors.torch import load_file

    locked, access = tmp_path / "locked", os.access
    locked.mkdir()  # tests run as root, whom permission bits do not stop: the check itself is what is tested
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and access(path, mode, **kw))

    teacher = save_timm(timm_repos.models[0], tmp_path / "teacher")
    before = load_file(teacher / "model.safetensors")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (tmp_path / "afile").write_text("x")
    common = ["generate", "--generator", "none", "--quiet", "--teachers", str(teacher), timm_repos.ids[1]]
    for out, message in [(mine, "is not empty and holds no student"), (teacher, "is teacher"),
                         (tmp_path / "afile", "it is a file"), ("", "empty path"),
                         (locked / "new" / "student", f"{str(locked)!r} is not writable")]:  # fmt: skip
        code, _, err = _run(capsys, *common, "--out", str(out))
        assert code == 2 and message in err, err
    assert list(locked.iterdir()) == []
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"
    after = load_file(teacher / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    student = tmp_path / "student"
    for anchor in ("0", "1"):  # the second save replaces the first student
        assert _run(capsys, *common, "--out", str(student), "--anchor", anchor)[0] == 0
    assert json.loads((student / "weightformer_config.json").read_text())["anchor"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_generate_refuses_generators_that_are_not_whole_weightformers(timm_repos, tmp_path, capsys):
    teachers = load_teachers(timm_repos.ids[:2])
    generator = WeightFormerModel.for_teachers(teachers, hidden_size=16, intermediate_size=32)
    generator.save_pretrained(tmp_path / "g")
    truncated, nan = tmp_path / "truncated", tmp_path / "nan"
    import shutil

    shutil.copytree(tmp_path / "g", truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with torch.no_grad():
        generator.decoders[0].bias.fill_(float("nan"))
    generator.save_pretrained(nan)
    teacher_folder = save_timm(timm_repos.models[0], tmp_path / "a-teacher")
    cases = [(teacher_folder, "not a WeightFormer's"), (truncated, "model.safetensors"),
             (nan, "parameter 'decoders.0.bias' contains NaN"), ("org/na me", "valid Hub repo id")]  # fmt: skip
    for source, message in cases:
        out = tmp_path / "student"
        code, _, err = _run(capsys, "generate", "--generator", str(source), "--teachers", *timm_repos.ids[:2],
                            "--out", str(out), "--quiet")  # fmt: skip
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not out.exists()


def test_evaluate_refuses_a_dataset_whose_classes_are_not_the_models(timm_repos, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    for name in ("ant", "bee", "yak"):  # three classes, none of the model's
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((28, 28), dtype=np.uint8), mode="L").save(tmp_path / "images" / name / "0.png")
    code, _, err = _run(capsys, "evaluate", "--model", timm_repos.ids[0], "--dataset", str(tmp_path / "images"),
                        "--split", "train")  # fmt: skip
    assert code == 2 and "are not the model's ['cat', 'dog', 'emu']" in err
    code, _, err = _run(capsys, "evaluate", "--model", timm_repos.ids[0], "--dataset", "mnist1d", "--num-samples", "0")
    assert code == 2 and "not a positive number" in err


def test_a_generator_whose_config_disagrees_with_its_weights_is_named(timm_repos, tmp_path, capsys):
    teachers = load_teachers(timm_repos.ids[:2])
    WeightFormerModel.for_teachers(teachers, hidden_size=16, intermediate_size=32).save_pretrained(tmp_path / "g")
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    config["intermediate_size"] = 48  # the saved MLP weights are 32 wide
    (tmp_path / "g" / "config.json").write_text(json.dumps(config))
    code, _, err = _run(capsys, "generate", "--generator", str(tmp_path / "g"), "--teachers", *timm_repos.ids[:2],
                        "--out", str(tmp_path / "student"), "--quiet")  # fmt: skip
    assert code == 2 and "cannot load a WeightFormer from it" in err and str(tmp_path / "g") in err
    assert err.count("\n") == 1 and not (tmp_path / "student").exists()


def test_evaluate_refuses_label_ids_beyond_the_models_classes_and_columns_without_images(timm_repos, tmp_path, capsys):
    import numpy as np
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    image = PILImage.fromarray(np.zeros((28, 28), dtype=np.uint8), mode="L")
    features = Features({"image": Image(), "label": Value("int64")})
    Dataset.from_dict({"image": [image, image], "label": [0, 4]}, features=features).save_to_disk(tmp_path / "ds")
    common = ["evaluate", "--model", timm_repos.ids[0], "--dataset", str(tmp_path / "ds")]
    code, _, err = _run(capsys, *common)
    assert code == 2 and "label ids 0..4, but the model has 3 classes" in err
    code, _, err = _run(capsys, *common, "--image-column", "label")
    assert code == 2 and "column 'label' of dataset" in err and "holds int values, not images" in err


def test_image_data_beyond_the_memory_cap_is_read_on_access_with_the_same_results(timm_repos, tmp_path, capsys,
                                                                                   monkeypatch):  # fmt: skip
    """Past `MAX_INPUT_BYTES` the images are preprocessed when a batch is taken (`LazyImages`): the same tensors,
    so `evaluate` and `--finetune-steps` give the very numbers and weights of the in-memory path."""
    import numpy as np
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage
    from safetensors.torch import load_file

    from weightformer_hf import scoring

    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L") for _ in range(5)]
    features = Features({"image": Image(), "label": Value("int64")})
    Dataset.from_dict({"image": images, "label": [0, 1, 2, 1, 0]}, features=features).save_to_disk(tmp_path / "ds")
    model, ds = load_teachers([timm_repos.ids[0]]), str(tmp_path / "ds")

    def outputs(tag):
        student = tmp_path / f"student-{tag}"
        code, out, err = _run(capsys, "evaluate", "--model", timm_repos.ids[0], "--dataset", ds, "--json")
        assert code == 0, err
        code, _, err = _run(capsys, "generate", "--generator", "none", "--teachers", *timm_repos.ids[:2], "--out",
                            str(student), "--finetune-steps", "3", "--finetune-dataset", ds, "--quiet")  # fmt: skip
        assert code == 0, err
        return json.loads(out), load_file(student / "model.safetensors")

    eager_inputs = scoring.evaluation_data(model, ds, "train", 5, 0, "image", "label")[0]
    eager = outputs("eager")
    one = eager_inputs[0]
    monkeypatch.setattr(scoring, "MAX_INPUT_BYTES", 2 * one.numel() * one.element_size())  # room for two
    lazy_inputs = scoring.evaluation_data(model, ds, "train", 5, 0, "image", "label")[0]
    assert isinstance(lazy_inputs, scoring.LazyImages) and len(lazy_inputs) == 5
    assert torch.equal(lazy_inputs[1:4], eager_inputs[1:4])
    assert torch.equal(lazy_inputs[torch.tensor([4, 0, 4])], eager_inputs[torch.tensor([4, 0, 4])])
    lazy = outputs("lazy")
    assert lazy[0] == eager[0]
    assert lazy[1].keys() == eager[1].keys() and all(torch.equal(lazy[1][k], eager[1][k]) for k in eager[1])
    assert not torch.equal(eager[1]["fc.weight"], timm_repos.models[0].state_dict()["fc.weight"])  # it trained
