"""The `weightformer` command line: `generate`, `evaluate`, `families` and `--version`.

Flags are kebab-case, as in the `hf` command line. Bad input (a missing repo, mismatched teachers, a
wrong flag) exits with status 2 and one line on stderr; progress bars appear only on a terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence

EXIT_BAD_INPUT = 2

_TEACHERS_HELP = (
    "teacher models: Hub repo ids (org/name, or org/name@rev with a branch, tag or commit) or local folders "
    "(written by save_pretrained or timm's save_for_hf); all of one architecture and label set"
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2 (argparse prints usage, which is two lines)."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="weightformer",
        description=(
            "WeightFormer for the Hugging Face ecosystem: read the weights of K trained teacher models "
            "(timm or transformers, from the Hub or local folders) and write one student model in a single "
            "forward pass."
        ),
        epilog="Run 'weightformer <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"weightformer_hf {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)

    gen = commands.add_parser(
        "generate",
        help="generate a student from teachers and save it as a timm or transformers repo folder",
        description=(
            "Generate one student from K teachers and save it to --out as a repo folder (weights, config, "
            "model card) that timm or transformers loads directly. Example:\n\n"
            "  weightformer generate --generator none --teachers org/a org/b@v1 ./my-teacher --out student"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument(
        "--generator",
        required=True,
        help="a trained WeightFormer: Hub repo id (org/name[@rev]) or local folder; 'none' uses an untrained "
        "generator, whose student equals the anchor teacher",
    )
    gen.add_argument("--teachers", nargs="+", required=True, metavar="TEACHER", help=_TEACHERS_HELP)
    gen.add_argument(
        "--anchor",
        type=_anchor,
        default=0,
        help="index of the teacher whose channel order the student keeps (default: 0, the first teacher), "
        "or 'best': the most accurate teacher on --anchor-dataset",
    )
    _add_data_flags(
        gen, "anchor", "with --anchor best: held-out labelled data to compare the teachers on (not the data you will "
        "report the student's accuracy on)", "validation", 1000, "compare on", 1,
        "evaluate's default is 0, so the choice is not made on the samples evaluate then measures",
    )  # fmt: skip
    gen.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        metavar="N",
        help="after generating, distil the student on the teachers' ensemble for N AdamW steps over "
        "--finetune-dataset (KD weight 0.3, T = 4, plus cross-entropy on its labels; the benchmark's "
        "kd_anchor_1k recipe). Worth it for teachers trained from scratch (default: 0, none)",
    )
    _add_data_flags(
        gen, "finetune", "with --finetune-steps: labelled data to distil on", "train", 10000, "distil on", 2,
        "also the minibatch order; neither evaluate's 0 nor --anchor-seed's 1",
    )  # fmt: skip
    gen.add_argument(
        "--finetune-learning-rate", type=float, default=3e-4, help="AdamW learning rate (default: 3e-4)"
    )
    gen.add_argument("--image-column", default="image", help="image column of an image dataset")
    gen.add_argument("--label-column", default="label", help="label column of an image dataset")
    gen.add_argument(
        "--format",
        choices=["timm", "transformers"],
        default=None,
        help="format of the saved student (default: the teachers' format; timm teachers may also "
        "be saved as transformers, not the other way round)",
    )
    gen.add_argument("--out", required=True, metavar="DIR", help="folder to write the student to")
    gen.add_argument(
        "--push-to-hub",
        metavar="ORG/NAME",
        default=None,
        help="also upload the saved folder to this Hub repo, in one commit",
    )
    gen.add_argument("--private", action="store_true", help="create the --push-to-hub repo as private")
    _add_loading_flags(gen)
    gen.add_argument("--quiet", action="store_true", help="no progress bars, warnings or summary")

    ev = commands.add_parser(
        "evaluate",
        help="measure a student (or teachers and their ensemble) on a dataset",
        description=(
            "Measure accuracy, NLL and calibration error of a saved student, or of teachers and their "
            "probability-average ensemble. Examples:\n\n"
            "  weightformer evaluate --model ./student --dataset mnist1d\n"
            "  weightformer evaluate --teachers org/a org/b --dataset org/my-images --split test"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--model", metavar="SOURCE", help="a student (or any model): Hub repo id or local folder"
    )
    what.add_argument("--teachers", nargs="+", metavar="TEACHER", help=_TEACHERS_HELP)
    ev.add_argument(
        "--dataset",
        required=True,
        help="'mnist1d' (generated locally, for the MLP/1-D CNN reference models), a Hub dataset "
        "id, or a local folder (datasets.save_to_disk output or an image folder)",
    )
    ev.add_argument("--split", default="test", help="dataset split (default: test)")
    ev.add_argument("--num-samples", type=_positive, default=1000, help="evaluate on at most this many samples")
    ev.add_argument("--seed", type=int, default=0, help="seed of the generated mnist1d samples (default: 0)")
    ev.add_argument("--image-column", default="image", help="image column of an image dataset")
    ev.add_argument("--label-column", default="label", help="label column of an image dataset")
    ev.add_argument("--batch-size", type=_positive, default=256)
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_loading_flags(ev)
    ev.add_argument("--quiet", action="store_true", help="no warnings")

    commands.add_parser(
        "families",
        help="list the supported architecture families",
        description="List the architecture families WeightFormer can read and write.",
    )
    return parser


def _add_data_flags(parser, prefix: str, what: str, split: str, num_samples: int, verb: str, seed: int, why: str):
    """--PREFIX-dataset, -split, -num-samples and -seed: labelled data read as `evaluate` reads --dataset."""
    parser.add_argument(
        f"--{prefix}-dataset", metavar="DATASET", help=f"{what}, as evaluate's --dataset reads it"
    )
    parser.add_argument(f"--{prefix}-split", default=split, help=f"its split (default: {split})")
    parser.add_argument(
        f"--{prefix}-num-samples", type=_positive, default=num_samples, help=f"{verb} at most this many samples"
    )
    parser.add_argument(
        f"--{prefix}-seed", type=int, default=seed, help=f"seed of generated mnist1d samples (default: {seed}; {why})"
    )


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return number


def _anchor(value: str) -> int | str:
    if value == "best":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a teacher index nor 'best'") from None


def _add_loading_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", default=None, help="revision for Hub teachers given without @rev")
    parser.add_argument(
        "--token", default=None, help="Hub token (default: the saved login or HF_TOKEN); never printed"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept teachers with only pickle weights (read with weights_only=True)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow teacher or generator repos to run their own code (pin a commit)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `weightformer` console script; returns the exit status."""
    from .errors import WeightFormerError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_BAD_INPUT
        _configure_output(getattr(args, "quiet", False))
        if args.command == "families":
            return _families()
        if args.command == "generate":
            return _generate(args)
        return _evaluate(args)
    except _UsageError as err:
        return _fail(str(err), prefix="")
    except (WeightFormerError, OSError) as err:  # OSError: a file the command had to read or write
        return _fail(str(err))
    except ImportError as err:
        return _fail(f"missing dependency: {err}")
    except KeyboardInterrupt:
        return 130


def _fail(message: str, prefix: str = "weightformer: error: ") -> int:
    one_line = " ".join(message.split())
    print(f"{prefix}{one_line}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _configure_output(quiet: bool) -> None:
    if quiet:
        logging.getLogger().setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    # library chatter (load reports, timm channel notes) is not for the command line
    for name in ("timm", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _families() -> int:
    from .families import FAMILIES

    width = max(len(name) for name in FAMILIES)
    for name, family in FAMILIES.items():
        print(f"{name:<{width}}  {family.format:<12}  {family.description}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .generate import generate

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = generate(
            args.teachers,
            generator=args.generator,
            anchor=args.anchor,
            out_dir=args.out,
            format=args.format,
            push_to_hub=args.push_to_hub,
            private=args.private,
            revision=args.revision,
            token=args.token,
            allow_pickle=args.allow_pickle,
            trust_remote_code=args.trust_remote_code,
            progress=False if args.quiet else None,
            anchor_dataset=args.anchor_dataset,
            anchor_split=args.anchor_split,
            anchor_num_samples=args.anchor_num_samples,
            anchor_seed=args.anchor_seed,
            image_column=args.image_column,
            label_column=args.label_column,
            finetune_steps=args.finetune_steps,
            finetune_dataset=args.finetune_dataset,
            finetune_split=args.finetune_split,
            finetune_num_samples=args.finetune_num_samples,
            finetune_seed=args.finetune_seed,
            finetune_learning_rate=args.finetune_learning_rate,
        )
    if not args.quiet:
        for warning in caught:
            if issubclass(warning.category, UserWarning) and "weightformer" in str(warning.filename):
                print(f"warning: {warning.message}", file=sys.stderr)
        teachers = ", ".join(info.identity for info in result.teachers.infos)
        print(f"student ({result.teachers.family.name}, K={len(result.teachers)}) saved to {result.out_dir}")
        print(f"teachers: {teachers}")
        if result.finetuning is not None:
            done = result.finetuning
            print(f"fine-tuned: {done.steps:,} KD steps on {done.data} ({done.seconds:.1f} s)")
        if result.anchor_choice is not None:
            choice = result.anchor_choice
            scores = " / ".join(f"{a:.4f}" for a in choice.accuracies)
            print(f"anchor: teacher {choice.index}, the most accurate on {choice.data} (accuracy {scores})")
            print(f"student accuracy on the same data: {choice.student_accuracy:.4f} "
                  f"(anchor {choice.accuracies[choice.index]:.4f})")  # fmt: skip
        if result.commit is not None:
            print(f"pushed: {getattr(result.commit, 'commit_url', result.commit)}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .scoring import evaluate_sources

    sources = [args.model] if args.model else list(args.teachers)
    results = evaluate_sources(
        sources,
        dataset=args.dataset,
        split=args.split,
        num_samples=args.num_samples,
        seed=args.seed,
        image_column=args.image_column,
        label_column=args.label_column,
        batch_size=args.batch_size,
        revision=args.revision,
        token=args.token,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'model':<40}  {'accuracy':>8}  {'nll':>8}  {'ece':>8}")
    for name, metrics in results.items():
        print(f"{name:<40}  {metrics['accuracy']:8.4f}  {metrics['nll']:8.4f}  {metrics['ece']:8.4f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
