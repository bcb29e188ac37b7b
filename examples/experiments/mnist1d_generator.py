"""Design experiments for the generator on MNIST-1D pools (the table in docs/experiments.md).

Trains a pool of converged teachers once (cached), splits it into 16 training teachers and disjoint
held-out sets, trains one generator variant and prints zero-shot G on held-out sets (and in-pool G).
Held-out sets are only ever evaluated, never used to pick anything inside a run.

    python examples/experiments/mnist1d_generator.py --pool mlp --gen_steps 1500 --tag baseline
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import weightformer_hf as wf
from weightformer_hf.batched_training import one_cycle, train_models_batched
from weightformer_hf.data import cache_root, mnist1d_splits
from weightformer_hf.evaluation import accuracy, ensemble_probs, gain_recovered
from weightformer_hf.reference_models import (
    Conv1dClassifier,
    Conv1dClassifierConfig,
    MLPClassifier,
    MLPClassifierConfig,
)


def new_model(kind: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    labels = {"id2label": {i: str(i) for i in range(10)}, "label2id": {str(i): i for i in range(10)}}
    if kind == "mlp":
        return MLPClassifier(MLPClassifierConfig(hidden_sizes=(256, 256), **labels))
    return Conv1dClassifier(Conv1dClassifierConfig(channels=(32, 32, 32), **labels))


def tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    split = split.with_format("torch")[:]
    return split["input_values"].float(), split["label"].long()


def build_pool(kind: str, n: int, steps: int, shared_init: bool, data) -> list[torch.nn.Module]:
    path = cache_root() / "experiments" / f"pool-{kind}-{n}-{steps}-{int(shared_init)}.safetensors"
    models = [new_model(kind, 0 if shared_init else 1000 + i) for i in range(n)]
    if path.exists():
        state = load_file(str(path))
        for i, m in enumerate(models):
            m.load_state_dict({k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{i}/")})
            m.eval()
        return models
    x, y = tensors(data["train"])
    train_models_batched(models, x, y, steps, data_seeds=[2000 + i for i in range(n)], desc=f"pool {kind}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {f"{i}/{k}": v.contiguous() for i, m in enumerate(models) for k, v in m.state_dict().items()},
        str(path),
    )
    return models


def rescaled(teachers: wf.TeacherSet, spread: float, step: int) -> wf.TeacherSet:
    """The same functions with every hidden ReLU unit's incoming weights and bias scaled by a and its
    outgoing weights by 1/a (a log-uniform in [e^-spread, e^spread]): a new weight vector per episode."""
    layers = teachers.layers[0]
    g = torch.Generator().manual_seed(step)
    new_states, infos = [], []
    for sd, info in zip(teachers.state_dicts, teachers.infos):
        sd = dict(sd)
        for layer, nxt in zip(layers[:-1], layers[1:]):
            a = torch.empty(layer.channels).uniform_(-spread, spread, generator=g).exp()
            for t in layer.tensors:
                sd[t.name] = sd[t.name] * a.view(-1, *[1] * (sd[t.name].dim() - 1))
            weight = nxt.tensors[0].name
            sd[weight] = sd[weight] / a.view(1, -1)
        new_states.append(sd)
        infos.append(wf.TeacherInfo(name=f"{info.name}~{step}"))
    return wf.TeacherSet(teachers.family, teachers.arch, teachers.label_names, new_states, infos,
                         template=teachers.template, check_finite=False)


@torch.no_grad()
def logits_of(models, x) -> torch.Tensor:
    return torch.stack([m(x).logits for m in models])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pool", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--shared_init", action="store_true")
    p.add_argument("--num_teachers", type=int, default=40)
    p.add_argument("--num_train_teachers", type=int, default=16)
    p.add_argument("--teacher_steps", type=int, default=6000)
    p.add_argument("--gen_steps", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--k_min", type=int, default=2)
    p.add_argument("--k_max", type=int, default=6)
    p.add_argument("--eval_k", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_hidden_layers", type=int, default=2)
    p.add_argument("--no_align", action="store_true")
    p.add_argument("--no_pool", action="store_true")
    p.add_argument("--no_cross", action="store_true")
    p.add_argument("--copy_path", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--rescale_aug", type=float, default=0.0, help="log-uniform ReLU rescaling of hidden units")
    p.add_argument("--fixed_set", action="store_true", help="every episode is all training teachers, anchor first")
    p.add_argument("--tag", default="")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    t0 = time.time()
    data = mnist1d_splits()
    pool = build_pool(args.pool, args.num_teachers, args.teacher_steps, args.shared_init, data)
    meta_x, meta_y = tensors(data["meta"])
    test_x, test_y = tensors(data["test"])
    meta_logits = logits_of(pool, meta_x)  # (N, M, C): the teachers' logits are cached once
    test_logits = logits_of(pool, test_x)
    names = [f"t{i}" for i in range(len(pool))]
    teachers = wf.TeacherSet.from_models(pool, names=names)
    train_ids = list(range(args.num_train_teachers))
    rest = list(range(args.num_train_teachers, len(pool)))
    heldout = [rest[i : i + args.eval_k] for i in range(0, len(rest) - args.eval_k + 1, args.eval_k)]

    torch.manual_seed(args.seed)
    generator = wf.WeightFormerModel.for_teachers(
        teachers.subset(train_ids[:1]),
        hidden_size=args.hidden_size,
        num_attention_heads=4,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        align_teachers=not args.no_align,
        pool_aligned=not args.no_pool,
        use_cross_token=not args.no_cross,
        copy_path=args.copy_path,
        dropout=args.dropout,
    )
    optimizer = torch.optim.AdamW(generator.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: one_cycle(s, args.gen_steps, 0.05))
    rng = random.Random(args.seed)
    generator.train()
    T = args.temperature
    losses = []
    for step in range(args.gen_steps):
        k = rng.randint(args.k_min, min(args.k_max, len(train_ids)))
        members = list(train_ids) if args.fixed_set else rng.sample(train_ids, k)
        episode = teachers.subset(members)
        if args.rescale_aug > 0:
            episode = rescaled(episode, args.rescale_aug, step)
        batch = torch.randint(len(meta_x), (args.batch_size,))
        state = generator(episode, anchor=0).student_state
        logits = wf.run_student(episode, state, meta_x[batch])
        target = ensemble_probs(meta_logits[members][:, batch] / T)
        kd = F.kl_div(F.log_softmax(logits / T, -1), target, reduction="batchmean") * T * T
        loss = args.alpha * kd + (1 - args.alpha) * F.cross_entropy(logits, meta_y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(generator.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 250 == 0 or step == args.gen_steps - 1:
            print(
                f"step {step} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} ({time.time() - t0:.0f}s)",
                flush=True,
            )

    def evaluate(sets):
        rows = []
        for members in sets:
            single = [accuracy(test_logits[i], test_y) for i in members]
            ens = accuracy(ensemble_probs(test_logits[members]), test_y)
            student = generator.generate_student(teachers.subset(members), anchor=0)
            with torch.no_grad():
                acc = accuracy(student(test_x).logits, test_y)
            mean_single = sum(single) / len(single)
            rows.append(
                {
                    "members": members,
                    "single_mean": mean_single,
                    "anchor": single[0],
                    "ensemble": ens,
                    "student": acc,
                    "G": gain_recovered(acc, mean_single, ens),
                    "G_anchor": gain_recovered(single[0], mean_single, ens),
                }
            )
        return rows

    heldout_rows = evaluate(heldout)
    in_pool = [list(train_ids)] if args.fixed_set else [rng.sample(train_ids, args.eval_k) for _ in range(3)]
    in_pool_rows = evaluate(in_pool)
    summary = {
        "tag": args.tag,
        "args": vars(args),
        "heldout_G": [round(r["G"], 3) for r in heldout_rows],
        "heldout_mean_G": sum(r["G"] for r in heldout_rows) / len(heldout_rows),
        "anchor_G": [round(r["G_anchor"], 3) for r in heldout_rows],
        "in_pool_mean_G": sum(r["G"] for r in in_pool_rows) / len(in_pool_rows),
        "rows": heldout_rows,
        "in_pool_rows": in_pool_rows,
        "seconds": time.time() - t0,
    }
    print(json.dumps({k: v for k, v in summary.items() if k not in ("rows", "in_pool_rows", "args")}))
    for row in in_pool_rows:
        print(f"in-pool {row['members']}: anchor {row['anchor']:.4f} student {row['student']:.4f}")
    out = Path("docs/experiments")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.jsonl", "a") as f:
        f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
