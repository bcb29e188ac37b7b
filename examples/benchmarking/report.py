"""The benchmark's outputs: per-method means with 95 % confidence intervals over held-out sets, the paired gain
over the anchor, the Markdown report and the accuracy-vs-K plot."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import torch

from weightformer_hf.pool import source_task

from .methods import METHODS

PAIRED_AGAINST = ["single_best_val", "greedy_soup", "uniform_soup", "kd_anchor_1k"]


def machine_info() -> dict:
    """What produced the numbers: CPU, cores, threads, library versions."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.cuda.is_available()}  # fmt: skip


def mean_ci(values: list[float]) -> tuple[float, float]:
    """The mean and the half-width of its 95 % confidence interval (Student t over the sets; nan for one set)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, float(t.ppf(0.975, len(values) - 1)) * sd / math.sqrt(len(values))


def summarize(rows: list[dict]) -> dict:
    """Per pool, K and method: mean accuracy, mean G ± 95 % CI over sets, and the paired gain over the anchor
    (G of the method − G of the set's anchor, the first teacher, where every WeightFormer student starts)."""
    anchor_g = {(r["pool"], r["k"], r["heldout_set"]): r.get("anchor_gain_recovered") for r in rows
                if r["method"] == "single_mean"}  # fmt: skip
    cells: dict = {}
    for r in rows:
        cell = cells.setdefault(r["pool"], {}).setdefault(r["k"], {}).setdefault(r["method"], [])
        cell.append(r)
    out: dict = {}
    for pool, ks in cells.items():
        for k, methods in ks.items():
            for method, rs in methods.items():
                g = [r["gain_recovered"] for r in rs]
                mean, ci = mean_ci(g)
                entry = {"accuracy": sum(r["accuracy"] for r in rs) / len(rs), "gain_recovered": mean,
                         "gain_recovered_ci95": ci, "gain_recovered_all": g, "sets": len(rs)}  # fmt: skip
                if method.startswith("weightformer") and method != "weightformer_in_pool":
                    entry["paired_vs"] = {}
                    for other in PAIRED_AGAINST:
                        theirs = {r["heldout_set"]: r["gain_recovered"] for r in methods.get(other, [])}
                        diffs = [
                            r["gain_recovered"] - theirs[r["heldout_set"]] for r in rs if r["heldout_set"] in theirs
                        ]
                        if diffs:
                            mean, ci = mean_ci(diffs)
                            wins = sum(d > 0 for d in diffs)
                            entry["paired_vs"][other] = {"mean": mean, "ci95": ci, "wins": wins, "sets": len(diffs)}
                if method != "weightformer_in_pool":
                    paired = [r["gain_recovered"] - anchor_g[(pool, k, r["heldout_set"])] for r in rs
                              if anchor_g.get((pool, k, r["heldout_set"])) is not None]  # fmt: skip
                    entry["paired_gain_over_anchor"], entry["paired_gain_ci95"] = mean_ci(paired)
                out.setdefault(pool, {}).setdefault(k, {})[method] = entry
    return out


def _fmt(mean: float, ci: float) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.2f} ± {ci:.2f}" if not math.isnan(ci) else f"{mean:.2f}"


def markdown(result: dict, command: str) -> str:
    summary = summarize(result["rows"])
    machine = result["machine"]
    lines = [
        "# WeightFormer benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch thread(s), "
        f"torch {machine['torch']}  ",
        f"Wall time: {result['wall_seconds'] / 60:.1f} min (pools cached; their build times are under Pools)",
        "",
        "G = (acc − mean single) / (ensemble − mean single) per held-out set; the table gives its mean over the "
        "sets ± the half-width of a 95 % confidence interval (Student t), and Δanchor, the paired gain over the "
        "set's anchor (G − anchor's G, same sets), with its own interval. Accuracy is the mean test accuracy. "
        "All choices (greedy-soup order, TIES k and λ, task-arithmetic λ, single_best_val) use the meta split; "
        "the test split only scores.",
        "",
        "## Pools",
        "",
        "| pool | teachers (train / held out) | held-out sets per K | recipe | mean teacher test acc | build |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in result["pools"].items():
        recipe = p["recipe"]
        if recipe["regime"] == "finetune":
            what = (
                f"fine-tunes of one base ({recipe['base_steps']} steps on {source_task(p['dataset'])}), lr 10^U"
                f"{list(recipe['finetune_log10_lr'])}, {'/'.join(map(str, recipe['finetune_steps']))} steps"
            )
        else:
            what = f"from scratch{' (shared init)' if recipe['shared_init'] else ''}, {recipe['train_steps']} steps"
        lines.append(
            f"| {name} | {p['num_train_teachers']} / {p['num_heldout_teachers']} | {p['heldout_sets']} | "
            f"{what} | {100 * p['mean_teacher_test_accuracy']:.2f} % | {p['build_seconds'] / 60:.1f} min |"
        )
    lines.append("")
    for pool, ks in summary.items():
        lines += [f"## {pool}", ""]
        k_list = sorted(ks)
        head = "| method | " + " | ".join(f"K={k} acc | K={k} G | K={k} Δanchor" for k in k_list) + " |"
        lines += [head, "|---|" + "---|---|---|" * len(k_list)]
        for method in METHODS:
            if not any(method in ks[k] for k in k_list):
                continue
            cells = []
            for k in k_list:
                cell = ks[k].get(method)
                if cell is None:
                    cells += ["", "", ""]
                    continue
                cells += [f"{100 * cell['accuracy']:.2f}", _fmt(cell["gain_recovered"], cell["gain_recovered_ci95"]),
                          _fmt(cell.get("paired_gain_over_anchor", float("nan")), cell.get("paired_gain_ci95",
                                                                                          float("nan")))]  # fmt: skip
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"- {n}" for n in result.get("notes", {}).get(pool, [])] + [""]
        lines += [
            "Paired per set: G of the WeightFormer student − G of the alternative on the same held-out set "
            "(mean ± 95 % CI; sets where the student wins).",
            "",
        ]
        lines += [
            "| student | K | " + " | ".join(f"vs {o}" for o in PAIRED_AGAINST) + " |",
            "|---|---|" + "---|" * len(PAIRED_AGAINST),
        ]
        for method in METHODS:
            for k in k_list:
                vs = ks[k].get(method, {}).get("paired_vs")
                if vs:
                    cells = [
                        f"{_fmt(vs[o]['mean'], vs[o]['ci95'])} ({vs[o]['wins']}/{vs[o]['sets']})" if o in vs else ""
                        for o in PAIRED_AGAINST
                    ]
                    lines.append(f"| {method} | {k} | " + " | ".join(cells) + " |")
        lines.append("")
    costs = result["costs"]
    lines += ["## Costs", ""] + cost_summary(costs) + ["", "All cost figures:", "", "```json"]
    lines += [json.dumps(costs, indent=2), "```", ""]
    return "\n".join(lines)


# methods the README's small-pool table compares with the anchor, in its column order
ANCHOR_TABLE_METHODS = [
    "weightformer_best_val_anchor", "greedy_soup", "ties_merge", "kd_anchor_1k", "weightformer_kd_1k", "ensemble",
]  # fmt: skip


def _percent_mean(values: list[float]) -> str:
    return f"{100 * sum(values) / len(values):.2f}" if values else "—"


def anchor_table(result: dict) -> list[str]:
    """Markdown rows, per pool and K, of mean test accuracies (%) next to the set's anchor: the kept generator
    step, the anchor, the student, the student − anchor per set (pp), then `ANCHOR_TABLE_METHODS`.

    The anchor (each set's first teacher) has no row of its own: its accuracy is the set's mean single accuracy
    plus its G times the ensemble's gain over that mean. Sets without an ensemble row (in-pool extras) are
    left out."""
    lines = []
    by_set: dict = {}
    for r in result["rows"]:
        by_set.setdefault((r["pool"], r["k"], r["heldout_set"]), {})[r["method"]] = r
    for pool in dict.fromkeys(r["pool"] for r in result["rows"]):
        validation = result.get("costs", {}).get("generator_training", {}).get(pool, {}).get("validation") or {}
        kept = validation.get("kept_step")
        for k in sorted({k for p, k, _ in by_set if p == pool}):
            sets = [m for (p, kk, _), m in sorted(by_set.items()) if p == pool and kk == k and "ensemble" in m]
            anchors, changes = [], []
            for m in sets:
                single, ensemble = m["single_mean"]["accuracy"], m["ensemble"]["accuracy"]
                anchor = single + m["single_mean"]["anchor_gain_recovered"] * (ensemble - single)
                anchors.append(anchor)
                changes.append(100 * (m["weightformer"]["accuracy"] - anchor))
            others = [_percent_mean([m[name]["accuracy"] for m in sets if name in m]) for name in ANCHOR_TABLE_METHODS]
            cells = [pool, str(k), "—" if kept is None else str(kept), _percent_mean(anchors),
                     _percent_mean([m["weightformer"]["accuracy"] for m in sets]),
                     " / ".join(f"{c:+.1f}" for c in changes), *others]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def cost_summary(costs: dict) -> list[str]:
    """A readable table of the cost figures (means over the sets of K = 4, else the largest K)."""
    lines = [
        "| pool | K | generation s (first / alignment cached) | kd_anchor_1k s | ratio | generator step / student KD "
        "step (same batch) | generator training |",
        "|---|---|---|---|---|---|---|",
    ]
    for pool, by_k in costs.get("time_ratios", {}).items():
        k = 4 if 4 in by_k else max(by_k)
        r = by_k[k]
        step = costs["train_step"].get(pool, {})
        train = costs["generator_training"].get(pool, {})
        lines.append(
            f"| {pool} | {k} | {r['weightformer_seconds']:.3f} / {r['weightformer_seconds_alignment_cached']:.3f} "
            f"| {r['kd_anchor_1k_seconds']:.1f} | {r['kd_anchor_1k_over_weightformer']:.0f}x "
            f"| {step.get('generator_step_seconds', float('nan')):.3f} s / "
            f"{step.get('student_kd_step_seconds', float('nan')):.4f} s = {step.get('ratio', float('nan')):.1f}x "
            f"(batch {step.get('batch_size', '?')}) "
            f"| {train.get('steps', 0)} steps, {train.get('seconds', float('nan')):.0f} s |"
        )
    return lines


def plot_accuracy_vs_k(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    pools = list(summary)
    cols = min(3, len(pools))
    nrows = math.ceil(len(pools) / cols)
    fig, grid = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.8 * nrows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(pools) :]:
        ax.axis("off")
    styles = {"ensemble": "k-", "single_mean": "k--", "weightformer": "C3o-", "weightformer_finetuned": "C3s:",
              "weightformer_best_val_anchor": "C6*-", "weightformer_kd_1k": "C3P--",
              "kd_anchor_1k": "C0^-", "kd_converged": "C2v-", "greedy_soup": "C1d-", "uniform_soup": "C5x-",
              "ties_merge": "C4P-", "single_best_val": "C7.-"}  # fmt: skip
    for ax, pool in zip(axes, pools):
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
        ax.set_ylabel("test accuracy (%), mean over sets")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Held-out teacher sets: accuracy vs K (y axis clipped; collapsed merges fall below)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
