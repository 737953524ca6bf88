"""``splatdd convert-ldm SRC DST`` (CompVis LDM checkpoint -> diffusers-format LDM directory) and
``splatdd train-ldm OUT_DIR`` (train a small class-conditional LDM, :mod:`splatdd_ld3m.train`).

Registered through the ``splatdd.commands`` entry point (``register(subparsers)``); also runnable
without the core CLI as ``python -m splatdd_ld3m.cli convert-ldm SRC DST``.
"""
from __future__ import annotations

import argparse
import sys


def _run_convert(args: argparse.Namespace) -> int:
    from .convert import convert_compvis_checkpoint

    null = -1 if args.null_class is None else (None if args.null_class < 0 else args.null_class)
    try:
        out = convert_compvis_checkpoint(args.src, args.dst, args.config, ema=args.ema,
                                         unsafe_pickle=args.unsafe_pickle, overwrite=args.overwrite,
                                         num_classes=args.num_classes, null_class=null)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"splatdd convert-ldm: error: {e}", file=sys.stderr)
        return 2
    from .ldm import load_ldm

    ldm = load_ldm(out)
    emb = ldm.class_embedder
    print(f"wrote {out}: {ldm.vae_kind.upper()} autoencoder (f{ldm.vae_factor}, {ldm.latent_channels} latent "
          f"channels), UNet at {ldm.latent_size}x{ldm.latent_size} latents ({ldm.image_size} px), "
          f"{emb.num_classes} classes + null class {emb.null_class}, embed dim {emb.embed_dim}")
    print(f"use it with: splatdd distill ... --param ld3m  (option model_path={out})")
    return 0


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert-ldm", help="convert a CompVis class-conditional LDM checkpoint for the ld3m parameterization",
        description="Convert a CompVis LatentDiffusion checkpoint (e.g. cin256-v2.ckpt) and its yaml into "
                    "the diffusers-format directory the ld3m parameterization loads (vae/, unet/, "
                    "scheduler/, class_embedder/). Nothing is downloaded.")
    p.add_argument("src", help="the checkpoint (.ckpt / .pt with a 'state_dict', or .safetensors)")
    p.add_argument("dst", help="output directory (created)")
    p.add_argument("--config", default=None,
                   help="the model's yaml (default: SRC with suffix .yaml), e.g. cin256-v2.yaml")
    p.add_argument("--ema", action="store_true", help="use the EMA weights (model_ema.*) of the UNet")
    p.add_argument("--num-classes", type=int, default=None,
                   help="number of real classes in the embedding table (default: rows - 1)")
    p.add_argument("--null-class", type=int, default=None,
                   help="row of the unconditional class for guidance (default: the last row; -1: none)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="load a checkpoint that needs full pickle (runs code from the file: trusted files only)")
    p.set_defaults(func=_run_convert, _splatdd_command="convert-ldm")
    return p


def _channels(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return vals


def _run_train(args: argparse.Namespace) -> int:
    import torch

    from .train import TrainLDMConfig, train_ldm

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    fields = {k: getattr(args, k) for k in (
        "work_dir", "dataset", "data_root", "image_size", "latent_channels", "ae_channels", "unet_channels",
        "ae_steps", "ae_batch_size", "ae_lr", "kl_weight", "unet_steps", "unet_batch_size", "unet_lr",
        "warmup_steps", "ema_decay", "label_dropout", "seed", "checkpoint_every", "sample_every",
        "sample_steps", "sample_guidance", "samples_per_class", "max_train_images", "stop_unet_at")}
    cfg = TrainLDMConfig(out_dir=args.out_dir, **fields)
    try:
        out = train_ldm(cfg, overwrite=args.overwrite, log_every=args.log_every)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"splatdd: error: {e}", file=sys.stderr)
        return 2
    print(f"use it with: splatdd distill ... --param ld3m --param-opt model_path={out}")
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    from splatdd.cli import nonneg_int, positive_float, positive_int

    from .train import TrainLDMConfig

    d = TrainLDMConfig(out_dir="")
    p = subparsers.add_parser(
        "train-ldm", help="train a small class-conditional latent diffusion model for the ld3m parameterization",
        description="Train a small class-conditional LDM (diffusers AutoencoderKL + UNet2DModel with class "
                    "embeddings, DDPM noise on the cin256 schedule) on a dataset splatdd loads, and write the "
                    "directory `--param-opt model_path=OUT_DIR` loads. Resumable: rerun the same command to "
                    "continue from WORK_DIR/checkpoint.pt. Sample grids go to WORK_DIR/samples/.")
    p.add_argument("out_dir", help="output LDM directory (written at the end, atomically)")
    p.add_argument("--work-dir", default=None, help="checkpoint and sample grids (default: OUT_DIR.work)")
    p.add_argument("--dataset", default=d.dataset, help="dataset name (default: %(default)s)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the dataset's usual place)")
    p.add_argument("--image-size", type=positive_int, default=d.image_size,
                   help="the LDM's resolution, multiple of 4 (default: %(default)s)")
    p.add_argument("--latent-channels", type=positive_int, default=d.latent_channels)
    p.add_argument("--ae-channels", type=_channels, default=d.ae_channels,
                   help="autoencoder widths, 3 levels (default: 16,32,32)")
    p.add_argument("--unet-channels", type=_channels, default=d.unet_channels,
                   help="UNet widths (default: 32,64,64)")
    p.add_argument("--ae-steps", type=nonneg_int, default=d.ae_steps)
    p.add_argument("--ae-batch-size", type=positive_int, default=d.ae_batch_size)
    p.add_argument("--ae-lr", type=positive_float, default=d.ae_lr)
    p.add_argument("--kl-weight", type=float, default=d.kl_weight)
    p.add_argument("--unet-steps", type=nonneg_int, default=d.unet_steps)
    p.add_argument("--unet-batch-size", type=positive_int, default=d.unet_batch_size)
    p.add_argument("--unet-lr", type=positive_float, default=d.unet_lr)
    p.add_argument("--warmup-steps", type=nonneg_int, default=d.warmup_steps)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--label-dropout", type=float, default=d.label_dropout,
                   help="probability of training on the null class (classifier-free guidance)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every)
    p.add_argument("--sample-every", type=positive_int, default=d.sample_every,
                   help="UNet steps between sample grids")
    p.add_argument("--sample-steps", type=positive_int, default=d.sample_steps)
    p.add_argument("--sample-guidance", type=float, default=d.sample_guidance)
    p.add_argument("--samples-per-class", type=positive_int, default=d.samples_per_class)
    p.add_argument("--max-train-images", type=positive_int, default=None)
    p.add_argument("--stop-unet-at", type=positive_int, default=None,
                   help="write the model after N UNet steps of the --unet-steps schedule (early export; "
                        "resumes from the checkpoint like any rerun)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between progress lines")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=_run_train, _splatdd_command="train-ldm")
    return p


def register(subparsers) -> None:
    """Entry point of group ``splatdd.commands``: add this plugin's subcommands."""
    add_convert_parser(subparsers)
    add_train_parser(subparsers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m splatdd_ld3m.cli")
    sub = ap.add_subparsers(dest="command", required=True)
    register(sub)
    args = ap.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
