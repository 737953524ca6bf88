"""Convert a CompVis class-conditional LDM checkpoint (e.g. ``cin256-v2.ckpt`` + its yaml) into the
diffusers-format directory that :func:`splatdd_ld3m.ldm.load_ldm` reads.

A CompVis ``LatentDiffusion`` checkpoint is a (Lightning) dict whose ``state_dict`` holds

* ``model.diffusion_model.*``: the ``openaimodel.UNetModel`` (input_blocks / middle_block /
  output_blocks, ResBlocks and SpatialTransformers),
* ``first_stage_model.*``: the autoencoder (taming-style ``encoder.down.{i}.block.{j}`` ...,
  ``quant_conv``, ``post_quant_conv`` and, for a VQ model, ``quantize.embedding.weight``),
* ``cond_stage_model.embedding.weight``: the ``ClassEmbedder`` table (cin256: 1001 x 512; row 1000
  is the unconditional class used by classifier-free guidance),
* top-level buffers (``betas``, ``alphas_cumprod``, ...), used here to check the noise schedule.

The key mapping below is our own, derived from the module structure of the two code bases (the
CompVis UNet's flat ``input_blocks`` list is re-indexed into diffusers' per-level ``down_blocks``,
``output_blocks`` into ``up_blocks``, ResBlock layer indices into named layers, and the VAE's 1x1
attention convolutions into linear layers). :func:`diffusers_to_compvis` is its inverse, used to make
the tiny test checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
COND_KEY = "cond_stage_model.embedding.weight"

_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


class ConversionError(ValueError):
    """The checkpoint or its config does not describe a model this converter supports."""


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------
def _get(params: dict[str, Any], key: str, default: Any = None, *, required: bool = False) -> Any:
    if key not in params:
        if required:
            raise ConversionError(f"config lacks required key {key!r}")
        return default
    return params[key]


def _unet_levels(p: dict[str, Any]) -> tuple[list[int], list[bool], list[int]]:
    """Per level: output channels, whether it has attention, number of attention heads."""
    mc = int(_get(p, "model_channels", required=True))
    mult = list(_get(p, "channel_mult", required=True))
    attn_res = set(int(a) for a in _get(p, "attention_resolutions", [], required=False))
    nh = int(_get(p, "num_heads", -1))
    nhc = int(_get(p, "num_head_channels", -1))
    chans = [mc * int(m) for m in mult]
    attn = [(2 ** lvl) in attn_res for lvl in range(len(mult))]
    heads = []
    for ch in chans:
        if nhc != -1:
            if ch % nhc:
                raise ConversionError(f"num_head_channels={nhc} does not divide {ch} channels")
            heads.append(ch // nhc)
        elif nh > 0:
            heads.append(nh)
        else:
            raise ConversionError("unet config needs num_heads or num_head_channels")
    return chans, attn, heads


def unet_config_from_compvis(p: dict[str, Any]) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs for CompVis ``openaimodel.UNetModel`` params ``p``."""
    if not _get(p, "use_spatial_transformer", False):
        raise ConversionError("only UNets with use_spatial_transformer=True (cross-attention on the class "
                              "embedding, as cin256) are supported")
    if _get(p, "num_classes") is not None:
        raise ConversionError("UNets with a label_emb (num_classes) are not supported; cin256 conditions "
                              "through cross-attention on cond_stage_model")
    if _get(p, "resblock_updown", False):
        raise ConversionError("resblock_updown=True is not supported")
    if int(_get(p, "dims", 2)) != 2:
        raise ConversionError("only 2-D UNets are supported")
    if not _get(p, "conv_resample", True):
        raise ConversionError("conv_resample=False is not supported")
    if _get(p, "n_embed") is not None:
        raise ConversionError("UNets predicting codebook ids (n_embed) are not supported")
    ctx = _get(p, "context_dim", required=True)
    if isinstance(ctx, (list, tuple)):
        raise ConversionError("a per-level context_dim is not supported")
    depth = _get(p, "transformer_depth", 1)
    if isinstance(depth, (list, tuple)):
        raise ConversionError("a per-level transformer_depth is not supported")
    chans, attn, heads = _unet_levels(p)
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    ss = int(_get(p, "image_size", 64))
    return dict(
        sample_size=ss, in_channels=int(_get(p, "in_channels", required=True)),
        out_channels=int(_get(p, "out_channels", required=True)), block_out_channels=tuple(chans),
        layers_per_block=int(_get(p, "num_res_blocks", required=True)), down_block_types=tuple(down),
        up_block_types=tuple(up), mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=int(ctx),
        attention_head_dim=tuple(heads),  # diffusers' legacy name for the number of heads
        transformer_layers_per_block=int(depth), norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
        flip_sin_to_cos=True, freq_shift=0,
        use_linear_projection=bool(_get(p, "use_linear_in_transformer", False)),
        resnet_time_scale_shift="scale_shift" if _get(p, "use_scale_shift_norm", False) else "default",
        dropout=0.0)


def vae_config_from_compvis(params: dict[str, Any], kind: str, *, scale_factor: float = 1.0
                            ) -> dict[str, Any]:
    """``VQModel`` / ``AutoencoderKL`` kwargs for a CompVis first-stage config's ``params``."""
    dd = _get(params, "ddconfig", required=True)
    if list(_get(dd, "attn_resolutions", [])):
        raise ConversionError("autoencoders with attention inside the encoder/decoder levels "
                              "(non-empty attn_resolutions) are not supported")
    ch = int(_get(dd, "ch", required=True))
    mult = [int(m) for m in _get(dd, "ch_mult", required=True)]
    L = len(mult)
    common = dict(in_channels=int(_get(dd, "in_channels", 3)), out_channels=int(_get(dd, "out_ch", 3)),
                  down_block_types=("DownEncoderBlock2D",) * L, up_block_types=("UpDecoderBlock2D",) * L,
                  block_out_channels=tuple(ch * m for m in mult),
                  layers_per_block=int(_get(dd, "num_res_blocks", required=True)), act_fn="silu",
                  norm_num_groups=32, sample_size=int(_get(dd, "resolution", 256)),
                  scaling_factor=float(scale_factor))
    z = int(_get(dd, "z_channels", required=True))
    embed_dim = int(_get(params, "embed_dim", required=True))
    if kind == "vq":
        if _get(dd, "double_z", False):
            raise ConversionError("a VQ autoencoder must have double_z=False")
        return dict(common, latent_channels=z, num_vq_embeddings=int(_get(params, "n_embed", required=True)),
                    vq_embed_dim=embed_dim)
    if not _get(dd, "double_z", True):
        raise ConversionError("a KL autoencoder must have double_z=True")
    if z != embed_dim:
        raise ConversionError(f"KL autoencoders need z_channels == embed_dim (got {z} and {embed_dim})")
    return dict(common, latent_channels=embed_dim)


def scheduler_config_from_compvis(params: dict[str, Any], betas: torch.Tensor | None = None
                                  ) -> dict[str, Any]:
    """``DDIMScheduler`` config for a CompVis LatentDiffusion's ``params`` (CompVis DDIM defaults:
    "uniform" spacing = diffusers "leading" with offset 1, alpha_prev of the last step =
    alphas_cumprod[0], no clipping). If the checkpoint's ``betas`` differ from the formula, they are
    stored as ``trained_betas``."""
    n = int(_get(params, "timesteps", 1000))
    sched = str(_get(params, "beta_schedule", "linear"))
    start = float(_get(params, "linear_start", 1e-4))
    end = float(_get(params, "linear_end", 2e-2))
    param = str(_get(params, "parameterization", "eps"))
    pred = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}.get(param)
    if pred is None:
        raise ConversionError(f"parameterization {param!r} is not supported")
    cfg: dict[str, Any] = dict(num_train_timesteps=n, beta_start=start, beta_end=end,
                               beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                               steps_offset=1, timestep_spacing="leading", prediction_type=pred)
    formula = None
    if sched == "linear":
        formula = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    elif betas is None:
        raise ConversionError(f"beta_schedule {sched!r} needs the checkpoint's 'betas' buffer")
    if betas is not None:
        b = betas.to(torch.float64).flatten()
        if b.numel() != n:
            raise ConversionError(f"checkpoint 'betas' has {b.numel()} entries, config says {n} timesteps")
        if formula is None or not torch.allclose(b, formula, rtol=1e-5, atol=1e-7):
            cfg["trained_betas"] = [float(x) for x in b]
    return cfg


def compvis_yaml_dict(unet_params: dict[str, Any], vae_params: dict[str, Any], *, vae_kind: str = "vq",
                      embed_dim: int = 512, n_classes: int = 1001, image_size: int = 64,
                      linear_start: float = 0.0015, linear_end: float = 0.0195) -> dict[str, Any]:
    """A CompVis-style yaml (as a dict) for a class-conditional LatentDiffusion (cin256-v2 layout)."""
    first = ("ldm.models.autoencoder.VQModelInterface" if vae_kind == "vq"
             else "ldm.models.autoencoder.AutoencoderKL")
    vp = dict(vae_params)
    vp.setdefault("lossconfig", {"target": "torch.nn.Identity"})
    if vae_kind != "vq":
        vp.pop("n_embed", None)
        vp["ddconfig"] = dict(vp["ddconfig"], double_z=True)
    return {"model": {
        "base_learning_rate": 1.0e-4,
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": linear_start, "linear_end": linear_end, "num_timesteps_cond": 1,
            "log_every_t": 200, "timesteps": 1000, "first_stage_key": "image",
            "cond_stage_key": "class_label", "image_size": image_size,
            "channels": int(unet_params["in_channels"]), "cond_stage_trainable": True,
            "conditioning_key": "crossattn", "monitor": "val/loss", "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                            "params": dict(unet_params)},
            "first_stage_config": {"target": first, "params": vp},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                  "params": {"embed_dim": embed_dim, "key": "class_label",
                                             "n_classes": n_classes}},
        }}}


# ------------------------------------------------------------------------------------------------
# key mapping tables: (compvis module prefix, diffusers module prefix, suffix map or None)
# ------------------------------------------------------------------------------------------------
def unet_module_table(p: dict[str, Any]) -> list[tuple[str, str, dict[str, str] | None]]:
    """Module correspondences of a CompVis UNetModel (params ``p``) and UNet2DConditionModel."""
    chans, attn, _ = _unet_levels(p)
    nrb = int(p["num_res_blocks"])
    L = len(chans)
    t: list[tuple[str, str, dict[str, str] | None]] = [
        ("time_embed.0", "time_embedding.linear_1", None),
        ("time_embed.2", "time_embedding.linear_2", None),
        ("input_blocks.0.0", "conv_in", None),
        ("out.0", "conv_norm_out", None),
        ("out.2", "conv_out", None),
        ("middle_block.0", "mid_block.resnets.0", _UNET_RESNET),
        ("middle_block.1", "mid_block.attentions.0", None),
        ("middle_block.2", "mid_block.resnets.1", _UNET_RESNET),
    ]
    i = 1
    for lvl in range(L):
        for j in range(nrb):
            t.append((f"input_blocks.{i}.0", f"down_blocks.{lvl}.resnets.{j}", _UNET_RESNET))
            if attn[lvl]:
                t.append((f"input_blocks.{i}.1", f"down_blocks.{lvl}.attentions.{j}", None))
            i += 1
        if lvl != L - 1:
            t.append((f"input_blocks.{i}.0.op", f"down_blocks.{lvl}.downsamplers.0.conv", None))
            i += 1
    o = 0
    for k, lvl in enumerate(reversed(range(L))):
        for j in range(nrb + 1):
            t.append((f"output_blocks.{o}.0", f"up_blocks.{k}.resnets.{j}", _UNET_RESNET))
            nxt = 1
            if attn[lvl]:
                t.append((f"output_blocks.{o}.1", f"up_blocks.{k}.attentions.{j}", None))
                nxt = 2
            if lvl != 0 and j == nrb:
                t.append((f"output_blocks.{o}.{nxt}.conv", f"up_blocks.{k}.upsamplers.0.conv", None))
            o += 1
    return t


def vae_module_table(dd: dict[str, Any], kind: str) -> list[tuple[str, str, dict[str, str] | None]]:
    """Module correspondences of a taming-style autoencoder (``ddconfig`` ``dd``) and diffusers'."""
    L = len(dd["ch_mult"])
    nrb = int(dd["num_res_blocks"])
    t: list[tuple[str, str, dict[str, str] | None]] = [
        ("quant_conv", "quant_conv", None), ("post_quant_conv", "post_quant_conv", None)]
    if kind == "vq":
        t.append(("quantize.embedding", "quantize.embedding", None))
    for part in ("encoder", "decoder"):
        t += [(f"{part}.conv_in", f"{part}.conv_in", None),
              (f"{part}.norm_out", f"{part}.conv_norm_out", None),
              (f"{part}.conv_out", f"{part}.conv_out", None),
              (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET),
              (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET),
              (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTN)]
    for lvl in range(L):
        for j in range(nrb):
            t.append((f"encoder.down.{lvl}.block.{j}", f"encoder.down_blocks.{lvl}.resnets.{j}", _VAE_RESNET))
        if lvl != L - 1:
            t.append((f"encoder.down.{lvl}.downsample.conv", f"encoder.down_blocks.{lvl}.downsamplers.0.conv",
                      None))
    for lvl in range(L):
        k = L - 1 - lvl  # diffusers' decoder runs from the deepest level
        for j in range(nrb + 1):
            t.append((f"decoder.up.{lvl}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", _VAE_RESNET))
        if lvl != 0:
            t.append((f"decoder.up.{lvl}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv", None))
    return t


def _map_state(sd: dict[str, torch.Tensor], table, *, reverse: bool, what: str) -> dict[str, torch.Tensor]:
    """Rename the keys of ``sd`` by ``table`` (CompVis -> diffusers, or back with ``reverse``).

    Every key must be covered; the VAE attention's 1x1 convolutions become linear layers (and back)."""
    entries = []
    for c, d, m in table:
        attn = m is _VAE_ATTN
        if reverse:
            entries.append((d, c, None if m is None else {v: k for k, v in m.items()}, attn))
        else:
            entries.append((c, d, m, attn))
    entries.sort(key=lambda e: -len(e[0]))  # longest prefix first
    out: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, val in sd.items():
        for src, dst, smap, attn in entries:
            if not key.startswith(src + "."):
                continue
            suffix = key[len(src) + 1:]
            if smap is not None:
                head = next((a for a in sorted(smap, key=len, reverse=True) if suffix.startswith(a + ".")), None)
                if head is None:
                    unmatched.append(key)
                    break
                new_head = smap[head]
                suffix = new_head + suffix[len(head):]
                if attn and suffix.endswith(".weight") and new_head not in ("norm", "group_norm"):
                    if not reverse and val.ndim == 4:
                        val = val[:, :, 0, 0]          # 1x1 conv -> linear
                    elif reverse and val.ndim == 2:
                        val = val[:, :, None, None]    # linear -> 1x1 conv
            out[f"{dst}.{suffix}"] = val
            break
        else:
            unmatched.append(key)
    if unmatched:
        shown = ", ".join(unmatched[:8]) + (" ..." if len(unmatched) > 8 else "")
        raise ConversionError(f"{what}: {len(unmatched)} checkpoint keys have no counterpart: {shown}")
    return out


# ------------------------------------------------------------------------------------------------
# the conversion
# ------------------------------------------------------------------------------------------------
def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found: pass the model's yaml with --config "
                                "(for cin256-v2.ckpt that is configs/latent-diffusion/cin256-v2.yaml)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"config {path} is not valid YAML: {e}") from e
    if not isinstance(cfg, dict) or "model" not in cfg or "params" not in (cfg.get("model") or {}):
        raise ValueError(f"config {path} is not a CompVis LatentDiffusion config (no model.params)")
    return cfg


def _load_checkpoint(path: Path, *, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (expected a CompVis .ckpt such as cin256-v2.ckpt)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=not unsafe_pickle)
        except Exception as e:  # pickle errors come in many types
            extra = ("" if unsafe_pickle else " If you trust the file, retry with --unsafe-pickle (it runs "
                     "pickled code from the checkpoint).")
            raise ValueError(f"could not read checkpoint {path}: {e}.{extra}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not any(str(k).startswith(UNET_PREFIX) for k in sd):
        raise ValueError(f"checkpoint {path} does not look like a CompVis LatentDiffusion state dict "
                         f"(no '{UNET_PREFIX}*' keys)")
    return sd


def _target_kind(target: str) -> str:
    t = target.rsplit(".", 1)[-1]
    if t.startswith("VQModel"):
        return "vq"
    if t.startswith("AutoencoderKL"):
        return "kl"
    raise ConversionError(f"first stage {target!r} is not supported (VQModel / VQModelInterface / "
                          "AutoencoderKL are)")


def compvis_to_diffusers_parts(sd: dict[str, torch.Tensor], cfg: dict[str, Any], *, ema: bool = False,
                               num_classes: int | None = None, null_class: int | None = -1
                               ) -> dict[str, Any]:
    """Build the diffusers components from a CompVis state dict and yaml dict (no disk access)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, VQModel

    from .ldm import ClassEmbedder

    params = cfg["model"]["params"]
    ck = _get(params, "conditioning_key", "crossattn")
    if ck != "crossattn":
        raise ConversionError(f"conditioning_key {ck!r} is not supported (class-conditional cross-attention "
                              "models such as cin256 use 'crossattn')")
    cond_target = str(_get(params, "cond_stage_config", {}).get("target", ""))
    if not cond_target.endswith("ClassEmbedder"):
        raise ConversionError(f"cond_stage_config target {cond_target!r} is not a ClassEmbedder: only "
                              "class-conditional models are supported")
    unet_p = dict(params["unet_config"]["params"])
    first = params["first_stage_config"]
    kind = _target_kind(str(first["target"]))
    scale = float(sd["scale_factor"]) if "scale_factor" in sd else float(_get(params, "scale_factor", 1.0))

    # --- UNet
    if ema:
        # LitEma names: model_ema.<key without dots> for every model.diffusion_model key
        src = {}
        for k in sd:
            if k.startswith(UNET_PREFIX):
                ek = "model_ema." + ("diffusion_model" + k[len(UNET_PREFIX):]).replace(".", "")
                if ek not in sd:
                    raise ConversionError(f"--ema: checkpoint has no EMA weights ({ek} missing)")
                src[k[len(UNET_PREFIX):]] = sd[ek]
    else:
        src = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    unet = UNet2DConditionModel(**unet_config_from_compvis(unet_p))
    usd = _map_state(src, unet_module_table(unet_p), reverse=False, what="unet")
    _load_strict(unet, usd, "unet")

    # --- autoencoder
    vae_cls = VQModel if kind == "vq" else AutoencoderKL
    vae = vae_cls(**vae_config_from_compvis(first["params"], kind, scale_factor=scale))
    vsrc = {k[len(VAE_PREFIX):]: v for k, v in sd.items()
            if k.startswith(VAE_PREFIX) and not k.startswith(VAE_PREFIX + "loss.")}
    vsd = _map_state(vsrc, vae_module_table(first["params"]["ddconfig"], kind), reverse=False, what="vae")
    _load_strict(vae, vsd, "vae")

    # --- class embedder
    if COND_KEY not in sd:
        raise ConversionError(f"checkpoint lacks {COND_KEY} (the class embedding table)")
    w = sd[COND_KEY].to(torch.float32)
    rows, dim = w.shape
    if null_class == -1:  # default: the last row is the null class when there is one more row than classes
        n_cls = num_classes if num_classes is not None else rows - 1
        null = rows - 1 if n_cls < rows else None
    else:
        null = null_class
        n_cls = num_classes if num_classes is not None else (rows - 1 if null == rows - 1 else rows)
    emb = ClassEmbedder(rows, dim, num_classes=n_cls, null_class=null)
    with torch.no_grad():
        emb.embedding.weight.copy_(w)
    sched = DDIMScheduler(**scheduler_config_from_compvis(params, sd.get("betas")))
    return {"vae": vae, "unet": unet, "scheduler": sched, "class_embedder": emb, "vae_kind": kind,
            "scale_factor": scale}


def _load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:4]})")
        if extra:
            parts.append(f"unexpected {len(extra)} (e.g. {extra[:4]})")
        if bad:
            parts.append("shape mismatch " + ", ".join(f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                                                       for k in bad[:4]))
        raise ConversionError(f"{what}: the checkpoint does not match the architecture in the yaml: "
                              + "; ".join(parts))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def convert_compvis_checkpoint(ckpt: str | os.PathLike, out_dir: str | os.PathLike,
                               config: str | os.PathLike | None = None, *, ema: bool = False,
                               unsafe_pickle: bool = False, overwrite: bool = False,
                               num_classes: int | None = None, null_class: int | None = -1) -> Path:
    """Convert ``ckpt`` (+ ``config`` yaml; default: the ``.yaml`` next to it with the same stem)
    into the diffusers-format directory ``out_dir``. Returns ``out_dir``."""
    from .ldm import load_ldm, save_ldm

    ckpt = Path(ckpt).expanduser()
    if config is None:
        guess = ckpt.with_suffix(".yaml")
        if not guess.is_file():
            raise FileNotFoundError(f"no --config given and {guess} does not exist: pass the model's yaml "
                                    "(for cin256-v2.ckpt: configs/latent-diffusion/cin256-v2.yaml from the "
                                    "CompVis latent-diffusion repository)")
        config = guess
    cfg = _load_yaml(Path(config).expanduser())
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (use --overwrite)")
    sd = _load_checkpoint(ckpt, unsafe_pickle=unsafe_pickle)
    parts = compvis_to_diffusers_parts(sd, cfg, ema=ema, num_classes=num_classes, null_class=null_class)
    manifest = {"source": f"splatdd convert-ldm from {ckpt.name}", "source_config": Path(config).name,
                "ema": ema, "vae": parts.pop("vae_kind"), "scale_factor": parts.pop("scale_factor")}
    save_ldm(parts, out, manifest=manifest)
    load_ldm(out)  # fail here, not at distillation time, if something is off
    return out


def diffusers_to_compvis(parts: dict[str, Any], unet_params: dict[str, Any], vae_params: dict[str, Any],
                         *, with_buffers: bool = True) -> dict[str, torch.Tensor]:
    """The inverse mapping: a CompVis LatentDiffusion state dict from diffusers components (used to
    write the tiny fake checkpoint). ``unet_params`` / ``vae_params`` are the CompVis configs."""
    kind = "vq" if type(parts["vae"]).__name__ == "VQModel" else "kl"
    usd = _map_state(parts["unet"].state_dict(), unet_module_table(unet_params), reverse=True, what="unet")
    vsd = _map_state(parts["vae"].state_dict(), vae_module_table(vae_params["ddconfig"], kind), reverse=True,
                     what="vae")
    sd: dict[str, torch.Tensor] = {}
    sd.update({UNET_PREFIX + k: v.clone() for k, v in usd.items()})
    sd.update({VAE_PREFIX + k: v.clone() for k, v in vsd.items()})
    sd[COND_KEY] = parts["class_embedder"].embedding.weight.detach().clone()
    if with_buffers:
        sch = parts["scheduler"]
        betas = sch.betas.to(torch.float32)
        ac = sch.alphas_cumprod.to(torch.float32)
        sd["betas"] = betas
        sd["alphas_cumprod"] = ac
        sd["alphas_cumprod_prev"] = torch.cat([torch.ones(1), ac[:-1]])
        sd["sqrt_alphas_cumprod"] = ac.sqrt()
        sd["sqrt_one_minus_alphas_cumprod"] = (1 - ac).sqrt()
        sd["logvar"] = torch.zeros(len(ac))
    return sd


__all__ = ["ConversionError", "convert_compvis_checkpoint", "compvis_to_diffusers_parts",
           "diffusers_to_compvis", "unet_config_from_compvis", "vae_config_from_compvis",
           "scheduler_config_from_compvis", "compvis_yaml_dict", "unet_module_table", "vae_module_table"]
