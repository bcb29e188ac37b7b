"""Validation teachers choose the generator to keep (`training.ValidationTeachers`, `train_generator`).

Tiny MLP teachers on random data, trained in-process: what is asserted is which step is kept and that its
weights, not the last ones, come back, including step 0, which returns every anchor unchanged.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from families import perturb
from torch.utils.data import DataLoader

from weightformer_hf import TeacherSet, WeightFormerModel, training
from weightformer_hf.errors import WeightFormerError
from weightformer_hf.reference_models import MLPClassifier, MLPClassifierConfig

LABELS = {i: str(i) for i in range(10)}
EPISODES = training.EpisodeConfig(k_min=2, k_max=3, alpha=0.9, temperature=4.0, seed=0)


@pytest.fixture()
def pool():
    """6 teachers (4 train, 2 validate), 256 inputs, their logits, and a loader of `{"inputs", "labels", "index"}`."""
    torch.manual_seed(0)
    models = [MLPClassifier(MLPClassifierConfig(in_features=12, hidden_sizes=(16,), id2label=LABELS)).eval()
              for _ in range(6)]  # fmt: skip
    teachers = TeacherSet.from_models(models)
    x, y = torch.randn(256, 12), torch.randint(0, 10, (256,))
    with torch.no_grad():
        logits = torch.stack([m(x).logits for m in models])
    rows = [{"inputs": x[i], "labels": y[i], "index": torch.tensor(i)} for i in range(256)]
    loader = DataLoader(rows, batch_size=64, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    val = training.ValidationTeachers(teachers.subset([4, 5]), [([0, 1], 0), ([0, 1], 1)], x, y, logits[4:], EPISODES)
    return teachers, x, y, logits, loader, val


def _train(pool, learning_rate: float, steps: int = 12, eval_steps: int = 4, metric: str = "loss"):
    teachers, _, _, logits, loader, val = pool
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    train = teachers.subset([0, 1, 2, 3])
    generator = WeightFormerModel.for_teachers(train, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    optimizer, scheduler = training.optimizer_and_scheduler(generator, learning_rate, 0.0, "constant", 0, steps)
    generator, optimizer, loader, scheduler = accelerator.prepare(generator, optimizer, loader, scheduler)
    progress, seen = training.TrainingProgress(metric), []
    training.train_generator(
        accelerator, generator, optimizer, scheduler, loader, train, training.TeacherTargets(train, logits[:4]),
        EPISODES, steps, progress, show_progress=False, validation=val, eval_steps=eval_steps,
        on_validate=lambda step, loss, best: seen.append((step, loss, best)),
    )  # fmt: skip
    return accelerator.unwrap_model(generator), progress, seen


def test_the_untrained_generators_validation_loss_is_its_anchors_kd_loss(pool):
    teachers, x, y, logits, _, val = pool
    generator = WeightFormerModel.for_teachers(teachers, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    expected = [training.kd_loss(logits[4 + a], logits[4:], y, 0.9, 4.0).item() for a in (0, 1)]
    accuracy = sum((logits[4 + a].argmax(-1) == y).float().mean().item() for a in (0, 1)) / 2
    scores = val.scores(generator)
    assert scores["loss"] == pytest.approx(sum(expected) / 2, rel=1e-6) and scores["accuracy"] == accuracy
    assert generator.training  # its mode is restored


def test_a_prepared_student_is_scored_as_prepared(pool):
    teachers, x, y, logits, _, val = pool
    generator = WeightFormerModel.for_teachers(teachers, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    prepared = []

    def silence_the_last_layer(student):  # any change the scores must see
        prepared.append(student)
        student.state_dict()[next(reversed(student.state_dict()))].zero_()
        return student

    val.prepare_student = silence_the_last_layer
    scores = val.scores(generator)
    assert len(prepared) == 2
    with torch.no_grad():
        expected = [training.kd_loss(silence_the_last_layer(teachers.model(4 + a)).eval()(x).logits, logits[4:], y,
                                     0.9, 4.0).item() for a in (0, 1)]  # fmt: skip
    assert scores["loss"] == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_a_run_that_only_hurts_keeps_step_0_and_returns_the_anchors(pool):
    teachers = pool[0]
    generator, progress, seen = _train(pool, learning_rate=1.0)  # far too large: every step makes it worse
    assert [s for s, _, _ in seen] == [0, 4, 8, 12] and [b for _, _, b in seen] == [True, False, False, False]
    assert progress.best_step == 0 and progress.step == 12
    val_set = teachers.subset([4, 5])
    for anchor in (0, 1):
        student = generator.generate_student(val_set, anchor=anchor)
        for name, value in student.state_dict().items():
            assert torch.equal(value, val_set.state_dicts[anchor][name]), name


def test_a_run_that_helps_keeps_its_lowest_validation_loss_and_those_weights(pool):
    generator, progress, seen = _train(pool, learning_rate=3e-3)
    losses = [scores["loss"] for _, scores, _ in seen]
    assert progress.validation == [(s, scores["loss"], scores["accuracy"]) for s, scores, _ in seen]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert progress.best_step == seen[best][0] > 0 and progress.best_metric == losses[best]
    assert all(torch.equal(v, progress.best_state[k]) for k, v in generator.state_dict().items())
    assert pool[5].scores(generator)["loss"] == pytest.approx(progress.best_metric, rel=1e-6)


def test_one_process_neither_moves_nor_reduces_its_float64_sums(pool, monkeypatch):
    """MPS has no float64, and one process has nothing to sum: its validation totals stay on the CPU."""
    reduce = Accelerator.reduce

    def no_float64_reduce(self, tensor, *args, **kwargs):
        assert tensor.dtype != torch.float64, "one process reduced its validation totals"
        return reduce(self, tensor, *args, **kwargs)  # the training loss is averaged over ranks as before

    moved = []
    to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):  # the validation totals are the only float64 triples here
        if self.dtype == torch.float64 and self.shape == (3,):
            moved.append((args, kwargs))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "reduce", no_float64_reduce)
    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    generator, progress, seen = _train(pool, learning_rate=3e-3, steps=4)
    monkeypatch.undo()
    assert moved == [], "one process moved its validation totals"
    assert [s for s, _, _ in seen] == [0, 4]
    assert pool[5].scores(generator)["loss"] == pytest.approx(progress.best_metric, rel=1e-6)


def test_progress_round_trips_through_a_checkpoint_folder(pool, tmp_path):
    _, progress, _ = _train(pool, learning_rate=3e-3, steps=4, eval_steps=2)
    progress.save_best(tmp_path)
    restored = training.TrainingProgress()
    restored.load_state_dict(progress.state_dict())
    restored.load_best(tmp_path)
    assert (restored.step, restored.best_step, restored.best_metric) == (4, progress.best_step, progress.best_metric)
    assert restored.validation == progress.validation
    assert all(torch.equal(v, progress.best_state[k]) for k, v in restored.best_state.items())
    (tmp_path / training.TrainingProgress.BEST_FILE).unlink()
    with pytest.raises(WeightFormerError, match=f"records a best generator at step {progress.best_step} but has no"):
        restored.load_best(tmp_path)


def test_validation_sets_give_every_member_a_turn_as_anchor():
    sets = training.validation_sets([7, 8, 9, 10], ks=(2, 4, 6))  # 6 does not fit in 4 teachers
    pairs = [s for s in sets if len(s[0]) == 2]
    assert len(pairs) == 12 and len({tuple(m) for m, _ in pairs}) == 6  # all 6 pairs, both anchors each
    assert sorted(a for m, a in sets if len(m) == 4) == [0, 1, 2, 3]
    assert training.validation_sets([3], ks=(2,)) == []


def test_validation_teachers_name_what_does_not_fit(pool):
    teachers, x, y, logits, _, _ = pool
    val_teachers = teachers.subset([4, 5])
    with pytest.raises(training.PoolConfigError, match="at least one set of validation teachers"):
        training.ValidationTeachers(val_teachers, [], x, y, logits[4:], EPISODES)
    with pytest.raises(training.PoolConfigError, match=r"logits \(6, 256, 10\) do not match 2 validation teachers"):
        training.ValidationTeachers(val_teachers, [([0, 1], 0)], x, y, logits, EPISODES)
    with pytest.raises(training.PoolConfigError, match=r"and 256 inputs \(255 labels\)"):
        training.ValidationTeachers(val_teachers, [([0, 1], 0)], x, y[:-1], logits[4:], EPISODES)


def test_accuracy_as_the_metric_keeps_the_most_accurate_step_and_its_weights(pool):
    generator, progress, seen = _train(pool, learning_rate=3e-3, metric="accuracy")
    accuracies = [scores["accuracy"] for _, scores, _ in seen]
    best = max(range(len(seen)), key=lambda i: (accuracies[i], -i))  # ties: the earlier step
    assert progress.best_step == seen[best][0] and progress.best_metric == accuracies[best]
    assert 0 < progress.best_step < seen[-1][0]  # neither the anchors nor the last step, nor the loss's choice
    assert progress.best_step != seen[min(range(len(seen)), key=lambda i: seen[i][1]["loss"])][0]
    assert [is_best for *_, is_best in seen] == [a > max(accuracies[:i], default=-1) for i, a in enumerate(accuracies)]
    assert pool[5].scores(generator)["accuracy"] == accuracies[best]


def test_the_metric_decides_between_scores_and_ties_keep_the_earlier_step():
    model = torch.nn.Linear(1, 1)
    scores = [(0, 0.5, 0.80), (4, 0.4, 0.80), (8, 0.45, 0.82), (12, 0.6, 0.82)]  # (step, loss, accuracy)
    kept = {}
    for metric in ("loss", "accuracy"):
        progress = training.TrainingProgress(metric)
        for step, loss, accuracy in scores:
            progress.record(step, {"loss": loss, "accuracy": accuracy}, model)
        kept[metric] = (progress.best_step, progress.best_metric)
    assert kept == {"loss": (4, 0.4), "accuracy": (8, 0.82)}
    with pytest.raises(WeightFormerError, match="metric_for_best_model must be one of .* not 'f1'"):
        training.TrainingProgress("f1")


def test_a_checkpoint_resumes_only_under_the_metric_it_chose_by():
    progress = training.TrainingProgress("accuracy")
    progress.record(0, {"loss": 0.5, "accuracy": 0.8}, torch.nn.Linear(1, 1))
    with pytest.raises(WeightFormerError, match="kept its best generator by validation accuracy.*same .*'accuracy'"):
        training.TrainingProgress("loss").load_state_dict(progress.state_dict())
    old = {"step": 3, "best_step": 0, "best_loss": 0.5, "validation_steps": [0], "validation_losses": [0.5],
           "validation_accuracies": [0.8]}  # a checkpoint written before the option: it chose by loss
    restored = training.TrainingProgress()
    restored.load_state_dict(old)
    assert (restored.step, restored.best_step, restored.best_metric) == (3, 0, 0.5)


def test_validation_rows_split_the_meta_rows_once_and_for_all():
    train, held = training.validation_rows(100, 0.2)
    assert len(held) == 20 and sorted(train + held) == list(range(100)) and train == sorted(train)
    assert training.validation_rows(100, 0.2) == (train, held)
    assert training.validation_rows(100, 0.2, seed=1) != (train, held)
    assert training.validation_rows(10, 0.0) == (list(range(10)), [])
    with pytest.raises(training.PoolConfigError, match=r"must be in \[0, 1\), got 1.0"):
        training.validation_rows(100, 1.0)
    with pytest.raises(training.PoolConfigError, match="keeping 0.05 of 10 meta rows for validation keeps none"):
        training.validation_rows(10, 0.05)


def test_ranks_score_disjoint_shares_of_the_sets_that_sum_to_all_of_them(pool):
    teachers, x, y, logits, _, _ = pool
    val = training.ValidationTeachers(
        teachers.subset([3, 4, 5]), training.validation_sets(range(3), (2, 3)), x, y, logits[3:], EPISODES
    )  # 9 sets: 3 ranks of 3 sets, or 2 ranks of 5 and 4
    generator = WeightFormerModel.for_teachers(teachers, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    perturb(generator)  # not the anchors: every set's student differs
    whole = val.totals(generator)
    assert whole[2] == 9 * 256
    for world in (2, 3, 4):
        shares = [val.totals(generator, rank, world) for rank in range(world)]
        assert [int(s[2]) for s in shares] == [256 * len(val.sets[r::world]) for r in range(world)]
        total = torch.stack(shares).sum(0)
        assert total[1:].tolist() == whole[1:].tolist() and total[0].item() == pytest.approx(whole[0].item(), rel=1e-12)
    scores = val.scores(generator)
    loss, correct, count = whole.tolist()
    assert (scores["loss"], scores["accuracy"]) == (loss / count, correct / count)


def test_a_checkpoint_resumes_only_with_the_settings_it_was_written_with():
    settings = {"val_data_fraction": 0.2, "train_teachers": ["a", "b"], "seed": 0}
    state = training.TrainingProgress(settings=settings).state_dict()
    training.TrainingProgress(settings=dict(settings)).load_state_dict(state)  # the same: fine
    changed = {**settings, "val_data_fraction": 0.0, "train_teachers": ["a", "c"]}
    with pytest.raises(WeightFormerError, match=r"written with val_data_fraction=0.2 \(now 0.0\), "
                                                r"train_teachers=\['a', 'b'\] \(now \['a', 'c'\]\): resume with"):
        training.TrainingProgress(settings=changed).load_state_dict(state)


def test_a_non_finite_loss_stops_training_before_it_reaches_the_weights(pool):
    """NaN teacher logits (a corrupt cache, a zero temperature) give a NaN loss: training stops with an error
    naming the step, and the generator's weights and optimizer state are those before that step."""
    teachers, _, _, logits, loader, _ = pool
    accelerator = Accelerator(cpu=True)
    train = teachers.subset([0, 1, 2, 3])
    poisoned = logits[:4].clone()
    poisoned[2] = float("nan")  # teacher 2's logits: the first episode that draws it fails
    generator = WeightFormerModel.for_teachers(train, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    optimizer, scheduler = training.optimizer_and_scheduler(generator, 1e-3, 0.0, "constant", 0, 50)
    generator, optimizer, loader, scheduler = accelerator.prepare(generator, optimizer, loader, scheduler)
    progress, before = training.TrainingProgress("loss"), {}

    def remember(step, loss):  # the weights and optimizer state after each finite step (logging every step)
        moments = {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()}
        before.update(step=step, weights={k: v.clone() for k, v in generator.state_dict().items()}, moments=moments)

    remember(0, None)  # the first episode may be the one that fails

    with pytest.raises(WeightFormerError, match=r"the training loss is nan at step (\d+)") as error:
        training.train_generator(accelerator, generator, optimizer, scheduler, loader, train,
                                 training.TeacherTargets(train, poisoned), EPISODES, 50, progress,
                                 logging_steps=1, on_log=remember, show_progress=False)  # fmt: skip
    failed_step = int(error.value.args[0].split("at step ")[1].split()[0])
    assert progress.step == failed_step - 1 == before["step"]
    assert all(torch.isfinite(v).all() for v in generator.state_dict().values())
    assert all(torch.equal(v, before["weights"][k]) for k, v in generator.state_dict().items())
    moments = optimizer.state_dict()["state"]
    assert moments.keys() == before["moments"].keys()
    assert all(torch.equal(v, before["moments"][i][k]) for i, s in moments.items() for k, v in s.items())
