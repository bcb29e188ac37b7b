"""Time one WeightFormer training step against a student-only KD step (mnist1d-mlp preset, batch 256).

    python examples/step_time.py [--config mnist1d-mlp] [--batch_size 256] [--k 4] [--threads 1]
        [--generator_config '{"hidden_size": 64}']

- generator step: generate the student from K teachers, run it on the batch, KD loss against cached
  teacher logits, backward through the generator, AdamW step (what `examples/train.py` does per step);
- student-only KD step: the anchor itself distilled on the same cached logits (plain KD fine-tuning);
- live-teacher KD step: the same with the K teachers run on the batch (what online augmentation costs).

Random-init teachers: timing does not depend on what the teachers learned. Weight matching runs once per
teacher pair and is cached, so it is done before timing and reported separately.
"""

import argparse
import json
import statistics
import time

import torch
from weightformer_hf.hub_configs import load_preset

from weightformer_hf import TeacherSet, WeightFormerModel
from weightformer_hf import training as wf
from weightformer_hf.pool import PoolSpec, new_teacher


def timed(fn, repeats: int) -> float:
    """Median milliseconds of `fn` after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="mnist1d-mlp")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--generator_config", default="{}", help="JSON: WeightFormerConfig kwargs over the preset's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = load_preset(args.config)
    torch.manual_seed(0)
    labels_names = [str(i) for i in range(10)]
    models = [new_teacher(PoolSpec.from_dict(preset["pool"]), labels_names) for _ in range(args.k)]
    teachers = TeacherSet.from_models(models)
    in_features = preset["pool"]["model"].get("in_features", 40)
    inputs, labels = torch.randn(args.batch_size, in_features), torch.randint(0, 10, (args.batch_size,))
    with torch.no_grad():
        cached = torch.stack([m(inputs).logits for m in models])
    generator = WeightFormerModel.for_teachers(teachers, **{**preset["generator"], **json.loads(args.generator_config)})
    gen_opt = torch.optim.AdamW(generator.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    generator._alignments(teachers, 0)
    align_ms = 1000 * (time.perf_counter() - t0)
    episode = (list(range(args.k)), 0)

    def generator_step():
        loss = wf.episode_loss(generator, teachers, episode, inputs, labels, cached, 0.9, 4.0)
        loss.backward()
        gen_opt.step()
        gen_opt.zero_grad()

    student = teachers.model(0).train()
    student_opt = torch.optim.AdamW(student.parameters(), lr=3e-4)

    def kd_step(live: bool = False):
        if live:
            with torch.no_grad():
                targets = torch.stack([m(inputs).logits for m in models])
        else:
            targets = cached
        loss = wf.kd_loss(student(inputs).logits, targets, labels, 0.9, 4.0)
        loss.backward()
        student_opt.step()
        student_opt.zero_grad()

    gen_ms = timed(generator_step, args.repeats)
    kd_ms = timed(kd_step, args.repeats * 10)
    live_ms = timed(lambda: kd_step(live=True), args.repeats * 10)
    params = sum(p.numel() for p in generator.parameters()) / 1e6
    print(f"{args.config}: batch {args.batch_size}, K={args.k}, {torch.get_num_threads()} thread(s), "
          f"generator {params:.2f} M parameters")  # fmt: skip
    print(f"weight matching of {args.k - 1} teachers to the anchor (once, cached): {align_ms:.0f} ms")
    print(f"generator step:           {gen_ms:8.2f} ms")
    print(f"student-only KD step:     {kd_ms:8.2f} ms  (generator step = {gen_ms / kd_ms:.0f}x)")
    print(f"live-teacher KD step:     {live_ms:8.2f} ms  (K teacher forwards added: online augmentation)")


if __name__ == "__main__":
    main()
