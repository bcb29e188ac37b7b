"""Seconds and peak memory of generating one student from large timm teachers, alignment included.

    OMP_NUM_THREADS=2 python examples/large_generation.py [--cases resnet50 vgg11_bn vit_b32] [--out results]
        [--teachers random|fine_tuned] [--generator_config '{"cross_attention": "all"}'] [--suffix _all]
        [--generator_preset cifar10-vgg11 --suffix _preset]

For each case the teachers (random weights, 1000 classes; with `--teachers fine_tuned` one random base and
K - 1 noisy copies of it, channels in the base's order as fine-tunes of one checkpoint have) are saved with
`timm.models.save_for_hf` in a temporary folder; then fresh child processes run `load_teachers` +
`WeightFormerModel.for_teachers` (the class defaults, d 128 and 2 blocks; `--generator_preset` takes the
`generator` section of a preset instead, such as the d 256, 3-block generator the large presets train;
`--generator_config` overrides either) + `generate_student` (teachers weight-matched to the anchor,
`align_teachers=True`), first with an empty alignment cache ("cold"), then again with the cache the first run
wrote ("warm"). Peak RSS is Linux `VmHWM` of the child, counted from the end of its imports (timm's included:
`load_teachers` would otherwise import it inside the measured span), against the budget one teacher + K × the
largest layer + the generator's parameters. File-backed pages that first came in during the span are reported
apart (`RssFile` at its end minus at its start): they are the code of torch kernels the child had not run
before (about 20 MiB), not data. They come in early, with the first layers, and stay, so the peak without them
(peak increment minus their growth) is close to the peak of anonymous memory when the peak is late, as it is
here. Writes `results/large_generation.json` (`large_generation_fine_tuned.json`) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Noise of a fine-tune-like teacher, in units of each tensor's std (docstring of `fine_tune_like`).
FINE_TUNE_NOISE = 0.05
CASES = {  # name: (timm architecture, K, key in the JSON)
    "resnet50": ("resnet50", 8, "resnet50_k8"),
    "vgg11_bn": ("vgg11_bn", 4, "vgg11_k4"),
    "vit_b32": ("vit_base_patch32_224", 4, "vit_b32_k4"),
}


def _status_bytes(key: str) -> int:
    """A `/proc/self/status` field in bytes (`VmHWM`, `RssFile`); 0 where there is none. (Sampling `RssAnon`
    from a thread instead slowed a warm ResNet-50 generation by 12-25 %: it was not kept.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_model() -> str:
    """The CPU's model name from `/proc/cpuinfo` (empty where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def child(paths: list[str], generator_config: dict) -> None:
    """Runs in a fresh process: imports, then load + generate, reporting seconds and peak RSS."""
    import timm  # noqa: F401  (the teachers' library: its import, 20 MiB, is an import, not generation)
    import torch

    import weightformer_hf as wf
    from weightformer_hf.hub import load_teachers

    after_imports, file_after_imports = _status_bytes("VmHWM"), _status_bytes("RssFile")
    start = time.perf_counter()
    teachers = load_teachers(paths)
    load_seconds = time.perf_counter() - start
    after_load = _status_bytes("VmHWM")
    generator = wf.WeightFormerModel.for_teachers(teachers, **generator_config)
    generator_bytes = sum(p.numel() * p.element_size() for p in generator.parameters())
    start = time.perf_counter()
    student = generator.generate_student(teachers, anchor=0)
    generation_seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    anchor = teachers.state_dicts[0]
    same = all(torch.equal(v, anchor[k]) for k, v in student.state_dict().items())
    print(json.dumps({
        "rss_after_imports_bytes": after_imports,
        "peak_rss_after_load_bytes": after_load,
        "peak_rss_bytes": peak,
        "file_rss_increment_bytes": _status_bytes("RssFile") - file_after_imports,
        "generator_bytes": generator_bytes,
        "load_seconds": load_seconds,
        "generation_seconds": generation_seconds,
        "student_equals_anchor": same,  # an untrained generator returns the anchor bit for bit
    }))  # fmt: skip


def fine_tune_like(base: dict, seed: int, scale: float = FINE_TUNE_NOISE) -> dict:
    """`base` with every floating tensor moved by Gaussian noise of `scale` × its own std (BatchNorm variances
    multiplied by exp of that noise, so they stay positive): a stand-in for a fine-tune of one base, whose
    channels keep the base's order."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in base.items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        noise = torch.randn(value.shape, generator=generator) * scale
        if key.endswith("running_var"):
            out[key] = value * noise.exp()
        else:
            spread = value.std() if value.numel() > 1 else value.abs().mean()
            out[key] = value + noise * (spread if spread > 0 else 1.0)
    return out


def run_case(name: str, folder: Path, cache: Path, timeout: float, teachers: str, generator_config: str) -> dict:
    import timm
    import torch
    from torch import nn

    arch, k, _ = CASES[name]
    paths = []
    for i in range(k):
        if teachers == "random" or i == 0:
            torch.manual_seed(1000 + i)
            model = timm.create_model(arch, pretrained=False, num_classes=1000)
            if teachers == "fine_tuned":  # the base the other teachers are moved from (a copy: `model` is reused)
                base = {key: value.clone() for key, value in model.state_dict().items()}
        else:
            model.load_state_dict(fine_tune_like(base, seed=1000 + i))
        path = folder / f"{name}-{i}"
        timm.models.save_for_hf(model, str(path), safe_serialization=True)
        paths.append(str(path))
    teacher_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    largest = max(
        sum(t.numel() * t.element_size() for t in m.parameters(recurse=False))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    del model
    out: dict = {"architecture": arch, "k": k, "teacher_mib": teacher_bytes / 2**20}
    out["largest_layer_mib"] = largest / 2**20
    for phase in ("cold", "warm"):
        env = {**os.environ, "WEIGHTFORMER_HF_CACHE": str(cache)}
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(paths), "--generator_config", generator_config],
            capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{name} {phase} failed:\n{proc.stderr[-3000:]}")
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
        budget = teacher_bytes + k * largest + probe["generator_bytes"]
        increment = probe["peak_rss_bytes"] - probe["rss_after_imports_bytes"]
        without_file = increment - probe["file_rss_increment_bytes"]
        out[phase] = {
            "seconds": probe["load_seconds"] + probe["generation_seconds"],
            "load_seconds": probe["load_seconds"],
            "generation_seconds": probe["generation_seconds"],
            "child_wall_seconds_with_imports": wall,
            "peak_rss_increment_mib": increment / 2**20,
            "load_rss_increment_mib": (probe["peak_rss_after_load_bytes"] - probe["rss_after_imports_bytes"]) / 2**20,
            "budget_mib": budget / 2**20,
            "generator_mib": probe["generator_bytes"] / 2**20,
            "peak_rss_over_budget": increment / budget,
            "file_rss_increment_mib": probe["file_rss_increment_bytes"] / 2**20,
            "peak_without_file_pages_over_budget": without_file / budget,
            "student_equals_anchor": probe["student_equals_anchor"],
        }
    for path in paths:  # keep the temporary folder small between cases
        for file in Path(path).iterdir():
            file.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default="results")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--teachers", choices=["random", "fine_tuned"], default="random",
        help="random: independent random inits (no true channel correspondence: weight matching's worst case); "
        "fine_tuned: one random base and K - 1 copies moved by noise (fine_tune_like), written apart",
    )  # fmt: skip
    parser.add_argument(
        "--generator_config", default="{}",
        help="JSON: WeightFormerConfig kwargs over the class defaults (or over --generator_preset's section)",
    )  # fmt: skip
    parser.add_argument(
        "--generator_preset", help="a preset (hub_configs) whose `generator` section sizes the generator"
    )
    parser.add_argument("--suffix", default="", help="appended to the JSON file's name")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child), json.loads(args.generator_config))
        return
    import torch

    generator_config = json.loads(args.generator_config)
    if args.generator_preset:
        from weightformer_hf.hub_configs import load_preset

        generator_config = {**load_preset(args.generator_preset).get("generator", {}), **generator_config}
    args.generator_config = json.dumps(generator_config)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            results[CASES[name][2]] = run_case(
                name, Path(tmp) / "teachers", Path(tmp) / "cache", args.timeout, args.teachers, args.generator_config
            )
            print(name, json.dumps(results[CASES[name][2]]), flush=True)
    summary = {f"{key}_seconds": r["cold"]["seconds"] for key, r in results.items()}
    summary.update({f"{key}_seconds_warm": r["warm"]["seconds"] for key, r in results.items()})
    summary["peak_rss_over_budget"] = max(
        r[p]["peak_rss_over_budget"] for r in results.values() for p in ("cold", "warm")
    )
    summary["peak_without_file_pages_over_budget"] = max(
        r[p]["peak_without_file_pages_over_budget"] for r in results.values() for p in ("cold", "warm")
    )
    summary["details"] = results
    summary["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "note": "shared machine; seconds = load_teachers + generate_student inside a fresh process (imports excluded)",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary["teachers"] = args.teachers
    summary["generator_config"] = generator_config
    if args.generator_preset:
        summary["generator_preset"] = args.generator_preset
    if args.teachers == "fine_tuned":
        summary["fine_tune_noise"] = FINE_TUNE_NOISE
    suffix = ("" if args.teachers == "random" else f"_{args.teachers}") + args.suffix
    (out / f"large_generation{suffix}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("| case | K | cold s | warm s | peak RSS increment MiB | budget MiB | over budget | file-backed MiB "
          "| over budget without them |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        worst = {field: max(r["cold"][field], r["warm"][field]) for field in r["cold"]}
        print(f"| {key} | {r['k']} | {r['cold']['seconds']:.1f} | {r['warm']['seconds']:.1f} | "
              f"{worst['peak_rss_increment_mib']:.0f} | {r['cold']['budget_mib']:.0f} | "
              f"{worst['peak_rss_over_budget']:.2f} | {worst['file_rss_increment_mib']:.0f} | "
              f"{worst['peak_without_file_pages_over_budget']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
