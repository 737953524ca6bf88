"""``splatdd buffer``: train expert trajectories for trajectory matching (``tm``).

::

    splatdd buffer --dataset fashion_mnist --experts 100 --epochs 50 --lr 0.01 --out buffers/fmnist
    splatdd distill --algo tm --algo-opt buffer_dir=buffers/fmnist --ipc 1 ...

Interrupt it at any time: the same command resumes, keeping every finished expert.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from splatdd.augment import DEFAULT_STRATEGY
from splatdd.cli import (CLIError, HelpFormatter, load_data, parse_resolution, process_group,
                         resolve_device, set_threads)
from splatdd.cli import positive_float as _positive_float
from splatdd.cli import positive_int as _positive_int


def register(subparsers: Any) -> None:
    """The ``splatdd.commands`` entry point: adds ``splatdd buffer``."""
    p = subparsers.add_parser(
        "buffer", help="train expert trajectories for trajectory matching (tm); resumable",
        description="Train expert networks on the real training set and save each one's "
                    "per-epoch parameters (MTT's buffer.py): plain SGD, momentum 0, batch 256, "
                    "DSA. One file per expert, written atomically when the expert is done; "
                    "running the same command again resumes.",
        formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist",
                   help="fashion_mnist | mnist | cifar10 | cifar100 | imagefolder")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the dataset's)")
    p.add_argument("--resolution", default=None, help="resize to R or HxW")
    p.add_argument("--zca", action="store_true", help="ZCA-whiten the data (CIFAR protocol)")
    p.add_argument("--experts", type=_positive_int, default=100, help="number of experts")
    p.add_argument("--epochs", type=_positive_int, default=50, help="epochs per expert")
    p.add_argument("--lr", type=_positive_float, default=0.01, help="expert SGD learning rate")
    p.add_argument("--batch", type=_positive_int, default=256, help="expert batch size")
    p.add_argument("--dsa", action=argparse.BooleanOptionalAction, default=True,
                   help="DSA augmentation while training experts")
    p.add_argument("--dsa-strategy", default=DEFAULT_STRATEGY,
                   help="DSA transforms, '_'-separated")
    p.add_argument("--model", default="ConvNet", help="expert (and student) network")
    p.add_argument("--net-width", type=_positive_int, default=128, help="ConvNet width")
    p.add_argument("--net-depth", type=_positive_int, default=None,
                   help="ConvNet depth (default: by resolution)")
    p.add_argument("--seed", type=int, default=0, help="run seed; expert k draws its own stream from (seed, k)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--no-eval", action="store_true",
                   help="skip each expert's test accuracy")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="buffer directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``splatdd buffer``; under torchrun the experts are spread over the ranks
    (docs/distributed.md) and rank 0 prints the summary. Ctrl-C: a message, exit 130."""
    with process_group(resolve_device(args.device)) as device:
        return _run(args, device)


def _run(args: argparse.Namespace, device: Any) -> int:
    from splatdd import distributed

    from .buffer import BufferError, BufferInterrupted, ExpertBuffer, train_experts
    from .unroll import activation_bytes, estimate_unroll_bytes

    set_threads(args.threads)
    main = distributed.is_main()
    progress = not args.no_progress and main
    train, test = load_data(args.dataset, args.data_root, parse_resolution(args.resolution),
                            args.zca, device, progress)
    spec = train.spec
    if main:
        print(f"dataset {spec.name}: {len(train.labels)} train / {len(test.labels)} test images, "
              f"{spec.channels}x{spec.height}x{spec.width}, {spec.num_classes} classes"
              f"{', ZCA' if spec.zca else ''}", flush=True)
    try:
        train_experts(train, args.out, experts=args.experts, test=None if args.no_eval else test,
                      model=args.model, net_width=args.net_width, net_depth=args.net_depth,
                      epochs=args.epochs,
                      lr=args.lr, batch_size=args.batch, dsa=args.dsa,
                      dsa_strategy=args.dsa_strategy, seed=args.seed, progress=progress,
                      log=lambda s: print(s, flush=True))
    except BufferError as exc:
        raise CLIError(str(exc)) from None
    except BufferInterrupted as exc:
        import signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # a second Ctrl-C: no traceback
        print(f"\nsplatdd: {exc.message}", file=sys.stderr, flush=True)
        return 130
    if not main:
        return 0
    buf = ExpertBuffer.open(args.out)
    P = buf.num_params
    size = (buf.epochs + 1) * P * 4
    print(f"{buf.num_experts} experts in {args.out}: {P:,} parameters, {buf.epochs + 1} snapshots "
          f"each ({size / 2**20:.1f} MiB per expert file)")
    # What a tm run on this buffer will hold in memory for its student unroll (the dominant cost).
    from . import _core
    net = _core.get_network(args.model, spec.channels, spec.num_classes,
                            (spec.height, spec.width), width=args.net_width, depth=args.net_depth,
                            seed=0)
    for ipc, steps in ((1, 50), (10, 60)):
        b = spec.num_classes * ipc
        act = activation_bytes(net, (b, spec.channels, spec.height, spec.width))
        est = estimate_unroll_bytes(P, steps, act)
        print(f"tm student unroll at IPC {ipc} (syn_steps {steps}, batch_syn {b}): "
              f"~{est['total_bytes'] / 2**20:.0f} MiB "
              f"({est['params_bytes'] / 2**20:.0f} MiB parameters + "
              f"{est['activation_bytes'] / 2**20:.0f} MiB activations), estimated")
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="splatdd")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
