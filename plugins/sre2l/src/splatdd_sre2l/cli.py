"""``splatdd teacher``: SRe2L's squeeze stage, a BatchNorm teacher trained on the real data.

::

    splatdd teacher --dataset fashion_mnist --model ConvNet --epochs 10 --out teachers/fmnist
    splatdd distill --algo sre2l --algo-opt teacher=teachers/fmnist --param gaussian --ipc 1 ...

Interrupt it at any time: the same command resumes from the last finished epoch.
"""
from __future__ import annotations

import argparse
from typing import Any

from splatdd.cli import load_data, parse_resolution, resolve_device, set_threads
from splatdd.cli import CLIError, HelpFormatter, positive_float, positive_int


def register(subparsers: Any) -> None:
    """The ``splatdd.commands`` entry point: adds ``splatdd teacher``."""
    p = subparsers.add_parser(
        "teacher", help="train a BatchNorm teacher for sre2l / the soft-label protocol; resumable",
        description="Train a BatchNorm teacher on the real training set (SRe2L's squeeze): SGD "
                    "momentum 0.9, wd 5e-4, cosine lr, random crop + flip. Writes "
                    "OUT/teacher.pt (model, dataset, normalisation, test accuracy, weights); "
                    "checkpoints after every epoch, so running the same command again resumes.",
        formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist",
                   help="fashion_mnist | mnist | cifar10 | cifar100 | imagefolder")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the dataset's)")
    p.add_argument("--resolution", default=None, help="resize to R or HxW")
    p.add_argument("--zca", action="store_true", help="ZCA-whiten the data (CIFAR protocol)")
    p.add_argument("--model", default="ConvNet", help="ConvNet | ConvNetD<k> | ResNet18 (BatchNorm)")
    p.add_argument("--width", type=positive_int, default=128, help="ConvNet width")
    p.add_argument("--depth", type=positive_int, default=None,
                   help="ConvNet depth (default: by resolution)")
    p.add_argument("--epochs", type=positive_int, default=10, help="training epochs")
    p.add_argument("--lr", type=positive_float, default=0.01, help="SGD learning rate (cosine)")
    p.add_argument("--batch", type=positive_int, default=256, help="batch size")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="teacher directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .teacher import TeacherError, train_teacher

    if not (args.model.startswith("ConvNet") or args.model == "ResNet18"):
        raise CLIError(f"--model must be ConvNet, ConvNetD<k> or ResNet18, got {args.model!r}")
    device = resolve_device(args.device)
    set_threads(args.threads)
    progress = not args.no_progress
    train, test = load_data(args.dataset, args.data_root, parse_resolution(args.resolution),
                            args.zca, device, progress)
    spec = train.spec
    print(f"dataset {spec.name}: {len(train.labels)} train / {len(test.labels)} test images, "
          f"{spec.channels}x{spec.height}x{spec.width}, {spec.num_classes} classes", flush=True)
    try:
        info = train_teacher(train, test, args.out, model=args.model, epochs=args.epochs,
                             lr=args.lr, batch_size=args.batch, width=args.width,
                             depth=args.depth, seed=args.seed, device=device,
                             progress=progress, log=lambda s: print(s, flush=True))
    except (TeacherError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    print(f"teacher {info['model']} (BatchNorm) in {args.out}: test accuracy "
          f"{info['test_accuracy']:.2f} %")
    return 0
