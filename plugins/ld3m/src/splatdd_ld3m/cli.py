"""``splatdd convert-ldm SRC DST``: CompVis LDM checkpoint -> diffusers-format LDM directory.

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


def register(subparsers) -> None:
    """Entry point of group ``splatdd.commands``: add this plugin's subcommands."""
    add_convert_parser(subparsers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m splatdd_ld3m.cli")
    sub = ap.add_subparsers(dest="command", required=True)
    register(sub)
    args = ap.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
