"""GPU smoke benchmark: 200 bf16 training steps of the `cifar10-resnet18` preset on random-init teachers.

    python examples/gpu_check.py [--steps 200] [--num_teachers 8]

Synthetic data (random 32×32 images and labels) and untrained timm resnet18 teachers: this measures
throughput and memory of the real training step (generator pass + student forward/backward through
`weightformer_hf.training.episode_loss`), not accuracy. Needs a CUDA device; not part of the tests.
"""

import argparse
import random
import time

import timm
import torch
from accelerate import Accelerator
from weightformer_hf.hub_configs import load_preset

from weightformer_hf import TeacherSet, WeightFormerModel
from weightformer_hf import training as wf


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="cifar10-resnet18")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--num_teachers", type=int, default=6)
    parser.add_argument("--num_samples", type=int, default=4096)
    parser.add_argument("--teachers_on_cpu", action="store_true", help="keep teacher weights on the CPU (slower)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA device")
    preset = load_preset(args.config)
    accelerator = Accelerator(mixed_precision="bf16")
    device = accelerator.device
    torch.manual_seed(0)
    arch = dict(preset["pool"]["model"])
    name = arch.pop("timm")
    teachers = TeacherSet.from_models(
        [timm.create_model(name, num_classes=10, **arch) for _ in range(args.num_teachers)]
    )
    inputs = torch.randn(args.num_samples, 3, 32, 32)
    labels = torch.randint(0, 10, (args.num_samples,))
    with torch.no_grad():  # the "cache": teacher logits on the fixed synthetic data
        models = [teachers.model(i).to(device) for i in range(len(teachers))]
        cached = torch.stack([wf.logits_of(m(inputs.to(device))) for m in models])

    generator = WeightFormerModel.for_teachers(teachers, **preset["generator"])
    optimizer = torch.optim.AdamW(generator.parameters(), lr=preset["learning_rate"])
    generator, optimizer = accelerator.prepare(generator, optimizer)
    print(f"generator: {sum(p.numel() for p in generator.parameters()) / 1e6:.2f} M parameters")

    t0 = time.time()
    for anchor in range(len(teachers)):  # weight matching runs once per (anchor, teacher) pair, on the CPU
        accelerator.unwrap_model(generator)._alignments(teachers, anchor)
    print(f"weight matching of {len(teachers) * (len(teachers) - 1)} pairs: {time.time() - t0:.1f} s")
    if not args.teachers_on_cpu:  # tokens (and their alignment permutations) are then built on the GPU
        teachers = teachers.to(device)
    print(f"teacher weights on {'cpu' if args.teachers_on_cpu else device}")

    batch_size, rng = preset["per_device_train_batch_size"], random.Random(0)

    def step():
        members, anchor = wf.sample_episode(rng, len(teachers), preset["k_min"], preset["k_max"])
        idx = torch.randint(0, args.num_samples, (batch_size,))
        with accelerator.autocast():
            loss = wf.episode_loss(generator, teachers, (members, anchor), inputs[idx].to(device),
                                   labels[idx].to(device), cached[members][:, idx.to(device)],
                                   preset["alpha"], preset["temperature"])  # fmt: skip
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(generator.parameters(), preset["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad()
        return loss

    for _ in range(5):  # warm-up (cuDNN autotuning, allocator)
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.time() - t0
    print(f"{args.steps} bf16 steps (batch {batch_size}, K in [{preset['k_min']}, {preset['k_max']}]): "
          f"{args.steps / elapsed:.2f} steps/s, last loss {loss.item():.4f}")  # fmt: skip
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"peak GPU memory: {peak:.2f} GiB on {torch.cuda.get_device_name()}")

    # For scale: a student-only KD step (the anchor distilled directly on the ensemble), same batch.
    student = models[0].train()
    student_opt = torch.optim.AdamW(student.parameters(), lr=3e-4)
    student, student_opt = accelerator.prepare(student, student_opt)

    def kd_step():
        members = rng.sample(range(len(teachers)), min(4, len(teachers)))
        idx = torch.randint(0, args.num_samples, (batch_size,))
        with accelerator.autocast():
            logits = wf.logits_of(student(inputs[idx].to(device)))
            loss = wf.kd_loss(logits, cached[members][:, idx.to(device)], labels[idx].to(device), 0.9, 4.0)
        accelerator.backward(loss)
        student_opt.step()
        student_opt.zero_grad()

    for _ in range(5):
        kd_step()
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(args.steps):
        kd_step()
    torch.cuda.synchronize()
    print(f"student-only KD step: {args.steps / (time.time() - t0):.2f} steps/s")


if __name__ == "__main__":
    main()
