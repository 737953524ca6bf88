"""``splatdd fit``: fit real images with installed parameterizations at equal storage and report
PSNR, time and peak memory (the GSDD paper's Table 5). Registered through the ``splatdd.commands``
entry point ``fit = "splatdd_gaussian.cli:register"``.

::

    splatdd fit                                    # skimage photos (or FashionMNIST), 128 px
    splatdd fit --methods pixel,siren,gaussian --images 8 --steps 1000 --floats-per-image 963
    splatdd fit --methods gaussian --lr gaussian=0.01 -o gaussian:ssaa=1 --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

__all__ = ["register", "run"]


def _kv(items, what):
    out: dict[str, dict] = {}
    for item in items or []:
        if ":" not in item or "=" not in item.split(":", 1)[1]:
            raise SystemExit(f"splatdd fit: {what} expects METHOD:KEY=VALUE, got {item!r}")
        method, kv = item.split(":", 1)
        key, value = kv.split("=", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = {"True": True, "False": False}.get(value, value)
        out.setdefault(method, {})[key] = parsed
    return out


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fit", help="fit real images with parameterizations at equal storage (PSNR/time/memory)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="pixel,siren,gaussian",
                   help="comma-separated: 'pixel' (downsample + bilinear up), 'pixel-fit' "
                        "(optimised low-res pixels), or any installed parameterization name")
    p.add_argument("--source", default="auto",
                   help="'skimage' (bundled photographs), 'fashion_mnist', 'auto' or a folder")
    p.add_argument("--images", type=int, default=8, help="number of images to fit")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=1000, help="Adam steps, the same for every method")
    p.add_argument("--floats-per-image", type=float, default=963.0,
                   help="storage per image in fp32 floats (bytes = 4 x this); 963 = the paper's")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                   help="learning rate per method (default: each plugin's init_lr)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="extra build option for a parameterization (e.g. gaussian:ssaa=1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from splatdd_gaussian.fitting import (fit_method, format_table, load_images,
                                          machine_description)
    if args.threads:
        torch.set_num_threads(args.threads)
    lrs = {}
    for item in args.lr:
        method, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"splatdd fit: --lr expects METHOD=LR, got {item!r}")
        lrs[method] = float(value)
    options = _kv(args.option, "--option")
    images, desc = load_images(args.source, args.images, args.resolution, seed=args.seed)
    budget = 4.0 * args.floats_per_image
    print(f"images: {desc}")
    print(f"budget: {args.floats_per_image:g} fp32 floats = {budget:.0f} bytes per image; "
          f"{args.steps} steps; machine: {machine_description()}")
    results = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        res = fit_method(method, images, budget_bytes=budget, steps=args.steps,
                         lr=lrs.get(method), options=options.get(method), seed=args.seed,
                         device=args.device)
        mem = "n/a" if math.isnan(res.peak_memory_mb) else f"{res.peak_memory_mb:.1f} MB"
        print(f"{method}: PSNR {res.psnr:.2f} dB, {res.seconds:.2f} s, peak memory {mem}, "
              f"{res.bytes_per_image:.0f} bytes/image  [{res.detail}]", flush=True)
        results.append(res)
    print()
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"images": desc, "budget_bytes_per_image": budget,
                                               "steps": args.steps,
                                               "results": [r.as_dict() for r in results]},
                                              indent=2))
    return 0
