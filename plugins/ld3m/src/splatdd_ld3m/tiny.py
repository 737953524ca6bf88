"""A tiny class-conditional LDM with random weights, for tests, benchmarks and the default demo.

It has the structure of the CompVis ImageNet LDM (``cin256``) at toy size: a VQ autoencoder with
downsampling factor 4 and 3 latent channels, a UNet with cross-attention on a class embedding
(context of length 1) and a null class row for classifier-free guidance, and the cin256 noise
schedule (betas 0.0015 .. 0.0195, "scaled_linear", DDIM "leading" spacing with offset 1). Its weights
are random (seeded), so its images are not meaningful: it exercises the code paths, memory and
gradient flow, nothing else.

:func:`build_tiny_compvis_checkpoint` writes the same kind of model in the CompVis checkpoint format
(``state_dict`` with ``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.embedding.weight``) plus its yaml, so that ``splatdd convert-ldm`` can be tested.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .ldm import ClassEmbedder, save_ldm

#: Bump when the tiny architecture changes (part of the cache directory name).
TINY_VERSION = 1

# cin256-v2 noise schedule (CompVis "linear" = diffusers "scaled_linear")
CIN_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                    beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                    steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


def tiny_unet_compvis_params(channels_latent: int = 3, embed_dim: int = 32, latent_size: int = 8
                             ) -> dict[str, Any]:
    """The tiny UNet in CompVis ``openaimodel.UNetModel`` terms (used for the fake checkpoint)."""
    return dict(image_size=latent_size, in_channels=channels_latent, out_channels=channels_latent,
                model_channels=32, attention_resolutions=[2], num_res_blocks=1, channel_mult=[1, 2],
                num_heads=2, use_spatial_transformer=True, transformer_depth=1, context_dim=embed_dim)


def tiny_vae_compvis_params(channels: int, image_size: int) -> dict[str, Any]:
    """The tiny VQ-f4 autoencoder in CompVis terms."""
    return dict(embed_dim=3, n_embed=256,
                ddconfig=dict(double_z=False, z_channels=3, resolution=image_size, in_channels=channels,
                              out_ch=channels, ch=32, ch_mult=[1, 1, 2], num_res_blocks=1,
                              attn_resolutions=[], dropout=0.0))


def make_tiny_parts(num_classes: int = 10, image_size: int = 32, channels: int = 3, seed: int = 0,
                    *, vae: str = "vq", unet: str = "cross_attention", embed_dim: int = 32
                    ) -> dict[str, Any]:
    """The tiny model's components in memory (see :func:`build_tiny_ldm`)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel, VQModel

    if image_size % 4:
        raise ValueError(f"image_size must be a multiple of 4 (VQ-f4), got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    latent = image_size // 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        blocks = dict(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=32,
                      down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                      in_channels=channels, out_channels=channels, sample_size=image_size)
        if vae == "vq":
            v = VQModel(latent_channels=3, num_vq_embeddings=256, vq_embed_dim=3, scaling_factor=1.0, **blocks)
            # a random codebook of the latents' scale: the default init (uniform +-1/256) collapses
            # every latent onto ~0 and makes the decoder ignore its input
            with torch.no_grad():
                v.quantize.embedding.weight.normal_(0.0, 1.0)
        elif vae == "kl":
            v = AutoencoderKL(latent_channels=3, scaling_factor=1.0, **blocks)
        else:
            raise ValueError(f"vae must be 'vq' or 'kl', got {vae!r}")
        if unet == "cross_attention":
            u = UNet2DConditionModel(
                sample_size=latent, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
                cross_attention_dim=embed_dim, attention_head_dim=2,  # = number of heads (diffusers' legacy name)
                norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0)
            emb = ClassEmbedder(num_classes + 1, embed_dim, num_classes=num_classes, null_class=num_classes)
            torch.nn.init.normal_(emb.embedding.weight)
        elif unet == "time_embedding":
            u = UNet2DModel(
                sample_size=latent, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=num_classes + 1,
                norm_num_groups=32)
            emb = ClassEmbedder(num_classes + 1, u.class_embedding.embedding_dim, num_classes=num_classes,
                                null_class=num_classes)
            with torch.no_grad():
                emb.embedding.weight.copy_(u.class_embedding.weight)
        else:
            raise ValueError(f"unet must be 'cross_attention' or 'time_embedding', got {unet!r}")
    sched = DDIMScheduler(**CIN_SCHEDULE)
    return {"vae": v, "unet": u, "scheduler": sched, "class_embedder": emb}


def build_tiny_ldm(path: str | os.PathLike, num_classes: int = 10, image_size: int = 32,
                   channels: int = 3, seed: int = 0, *, vae: str = "vq",
                   unet: str = "cross_attention") -> Path:
    """Write a tiny random class-conditional LDM in the diffusers layout of :mod:`splatdd_ld3m.ldm`.

    ``image_size`` is the decoded resolution (latents are ``image_size // 4``, 3 channels);
    ``num_classes`` classes plus one null class for guidance. Deterministic in ``seed``."""
    parts = make_tiny_parts(num_classes, image_size, channels, seed, vae=vae, unet=unet)
    manifest = {"source": "splatdd_ld3m.tiny.build_tiny_ldm (random weights)", "tiny_version": TINY_VERSION,
                "num_classes": num_classes, "image_size": image_size, "channels": channels, "seed": seed,
                "vae": vae, "unet": unet}
    return save_ldm(parts, path, manifest=manifest)


def cache_dir() -> Path:
    """Where auto-built tiny models live: ``$SPLATDD_CACHE_DIR/ld3m`` or ``~/.cache/splatdd/ld3m``."""
    base = os.environ.get("SPLATDD_CACHE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "splatdd"
    return root / "ld3m"


def tiny_spec_for(channels: int, height: int, width: int, num_classes: int) -> dict[str, int]:
    """The tiny model's settings for a dataset: 32 px for <= 32 px data, else 64 px."""
    size = 32 if max(height, width) <= 32 else 64
    return {"num_classes": int(num_classes), "image_size": size, "channels": 1 if channels == 1 else 3,
            "seed": 0}


def default_tiny_path(num_classes: int = 10, image_size: int = 32, channels: int = 3, seed: int = 0) -> Path:
    """Path of the cached tiny model with these settings, built (atomically) on first use."""
    name = f"tiny-v{TINY_VERSION}-k{num_classes}-s{image_size}-c{channels}-seed{seed}"
    target = cache_dir() / name
    if (target / "unet" / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=name + ".", dir=str(target.parent)))
    try:
        build_tiny_ldm(tmp, num_classes=num_classes, image_size=image_size, channels=channels, seed=seed)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "unet" / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_compvis_checkpoint(ckpt_path: str | os.PathLike, yaml_path: str | os.PathLike | None = None,
                                  num_classes: int = 10, image_size: int = 32, channels: int = 3,
                                  seed: int = 0, *, vae: str = "vq") -> tuple[Path, Path]:
    """Write the tiny model as a CompVis ``.ckpt`` (``{"state_dict": ...}``) and its ``.yaml``.

    The state dict is produced from the tiny diffusers model through
    :func:`splatdd_ld3m.convert.diffusers_to_compvis` and carries the LatentDiffusion buffers
    (``betas``, ``alphas_cumprod``, ...) of the cin256 schedule. Returns (ckpt, yaml)."""
    from .convert import compvis_yaml_dict, diffusers_to_compvis

    parts = make_tiny_parts(num_classes, image_size, channels, seed, vae=vae)
    unet_p = tiny_unet_compvis_params(embed_dim=parts["class_embedder"].embed_dim, latent_size=image_size // 4)
    vae_p = tiny_vae_compvis_params(channels, image_size)
    sd = diffusers_to_compvis(parts, unet_p, vae_p)
    cfg = compvis_yaml_dict(unet_p, vae_p, vae_kind=vae, embed_dim=parts["class_embedder"].embed_dim,
                            n_classes=num_classes + 1, image_size=image_size // 4)
    ckpt = Path(ckpt_path)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd, "global_step": 0}, ckpt)
    yml = Path(yaml_path) if yaml_path is not None else ckpt.with_suffix(".yaml")
    import yaml

    with open(yml, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return ckpt, yml


def _main() -> None:  # pragma: no cover - convenience
    import argparse

    ap = argparse.ArgumentParser(description="write a tiny random class-conditional LDM")
    ap.add_argument("out")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(build_tiny_ldm(a.out, a.num_classes, a.image_size, a.channels, a.seed))
    print(json.dumps({"ok": True}))


if __name__ == "__main__":  # pragma: no cover
    _main()
