"""Loading a pretrained class-conditional latent diffusion model (LDM) from a local directory.

The on-disk layout is the diffusers one, one sub-folder per component::

    MODEL_DIR/
      vae/config.json, vae/diffusion_pytorch_model.safetensors
          diffusers ``VQModel`` (the CompVis ImageNet LDM uses a VQ-f4) or ``AutoencoderKL``
      unet/config.json, unet/diffusion_pytorch_model.safetensors
          diffusers ``UNet2DConditionModel`` whose cross-attention context is the class embedding
          (``cross_attention_dim`` = embedding size, a context of length 1: CompVis ``cin256``), or
          ``UNet2DModel`` with ``num_class_embeds`` (class embedding added to the time embedding)
      scheduler/scheduler_config.json
          a ``DDIMScheduler`` config (any DDPM-family config with the same beta fields is read as DDIM)
      class_embedder/config.json, class_embedder/diffusion_pytorch_model.safetensors
          ``embedding.weight`` of shape (num_embeddings, embed_dim); config
          ``{"num_classes": K, "null_class": K or null, ...}``. Row ``null_class`` is the unconditional
          ("null") embedding used by classifier-free guidance (CompVis cin256: 1001 rows, null = 1000).
          Required for ``UNet2DConditionModel``; optional for ``UNet2DModel`` (then only its null row
          is read from here; the embedding itself is the UNet's ``class_embedding``).

``splatdd convert-ldm ckpt DIR --config yaml`` writes this layout from a CompVis checkpoint, and
:func:`splatdd_ld3m.tiny.build_tiny_ldm` writes a tiny random one for tests and demos.

Nothing here downloads anything: every path must exist locally.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: What :func:`load_ldm` expects, quoted in its error messages.
LAYOUT_HELP = (
    "an LDM directory must contain: vae/ (diffusers VQModel or AutoencoderKL: config.json + "
    "diffusion_pytorch_model.safetensors), unet/ (UNet2DConditionModel with cross-attention on the class "
    "embedding, or UNet2DModel with num_class_embeds: config.json + diffusion_pytorch_model.safetensors), "
    "scheduler/scheduler_config.json (DDIMScheduler config) and class_embedder/ (config.json + "
    "diffusion_pytorch_model.safetensors holding 'embedding.weight'). A CompVis checkpoint (e.g. "
    "cin256-v2.ckpt + its yaml) is converted into this layout by `splatdd convert-ldm CKPT OUT_DIR --config "
    "YAML`; `splatdd_ld3m.tiny.build_tiny_ldm(OUT_DIR)` writes a tiny random model for tests."
)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
MANIFEST_NAME = "splatdd_ld3m.json"
_HASHED_FILES = ("vae/config.json", "unet/config.json", "scheduler/scheduler_config.json",
                 "class_embedder/config.json")


class ClassEmbedder(nn.Module):
    """``nn.Embedding`` from class index to conditioning vector (CompVis ``ClassEmbedder``).

    ``null_class`` is the row used as the unconditional embedding for classifier-free guidance
    (``None``: the model has none, and guidance must be 1).
    """

    def __init__(self, num_embeddings: int, embed_dim: int, *, num_classes: int | None = None,
                 null_class: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embed_dim)
        self.num_classes = int(num_classes if num_classes is not None else num_embeddings)
        self.null_class = None if null_class is None else int(null_class)
        if self.num_classes > num_embeddings:
            raise ValueError(f"class_embedder: num_classes={self.num_classes} > {num_embeddings} rows")
        if self.null_class is not None and not 0 <= self.null_class < num_embeddings:
            raise ValueError(f"class_embedder: null_class={self.null_class} is not a row of the "
                             f"{num_embeddings}-row embedding")

    @property
    def embed_dim(self) -> int:
        return self.embedding.embedding_dim

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels)

    def config_dict(self, context: str) -> dict[str, Any]:
        return {"_class_name": "ClassEmbedder", "num_embeddings": self.embedding.num_embeddings,
                "embed_dim": self.embed_dim, "num_classes": self.num_classes,
                "null_class": self.null_class, "context": context}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: missing {path}; {LAYOUT_HELP}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e}); {LAYOUT_HELP}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object; {LAYOUT_HELP}")
    return data


def model_config_hash(path: str | os.PathLike) -> str:
    """sha256 over the component config files (not the weights: hashing GBs at every load is slow).

    Recorded in a distilled file so that decoding it with a different model is refused."""
    root = Path(path)
    h = hashlib.sha256()
    for name in _HASHED_FILES:
        p = root / name
        h.update(name.encode())
        if p.is_file():
            # canonical JSON so that whitespace or key order do not matter
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
                h.update(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
            except (OSError, json.JSONDecodeError):
                h.update(p.read_bytes())
    return h.hexdigest()


def _load_component(cls, folder: Path, what: str):
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: missing folder {folder}; {LAYOUT_HELP}")
    _read_json(folder / CONFIG_NAME, what)
    if not (folder / WEIGHTS_NAME).is_file() and not (folder / "diffusion_pytorch_model.bin").is_file():
        raise FileNotFoundError(f"{what}: missing weights {folder / WEIGHTS_NAME}; {LAYOUT_HELP}")
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise ValueError(f"{what}: could not load {cls.__name__} from {folder}: {e}") from e


class ClassConditionalLDM(nn.Module):
    """A frozen class-conditional LDM: VAE (``vae``), denoiser (``unet``), class embedder, noise schedule.

    All weights are frozen (``requires_grad=False``) and in eval mode. Gradients still flow *through*
    the model to its inputs (latents and class embeddings).
    """

    def __init__(self, vae: nn.Module, unet: nn.Module, class_embedder: ClassEmbedder,
                 scheduler_config: dict[str, Any], *, path: str | None = None,
                 config_hash: str | None = None) -> None:
        super().__init__()
        self.vae = vae
        self.unet = unet
        self.class_embedder = class_embedder
        self.scheduler_config = dict(scheduler_config)
        self.path = path
        self.config_hash = config_hash
        vname = type(vae).__name__
        if vname == "VQModel":
            self.vae_kind = "vq"
        elif vname == "AutoencoderKL":
            self.vae_kind = "kl"
        else:
            raise ValueError(f"vae must be a diffusers VQModel or AutoencoderKL, got {vname}")
        uname = type(unet).__name__
        if uname == "UNet2DConditionModel":
            self.conditioning = "cross_attention"
            cad = unet.config.cross_attention_dim
            if isinstance(cad, (list, tuple)):
                raise ValueError("unet: a per-block cross_attention_dim is not supported")
            if cad != class_embedder.embed_dim:
                raise ValueError(f"unet.cross_attention_dim={cad} differs from the class embedder's "
                                 f"embed_dim={class_embedder.embed_dim}")
        elif uname == "UNet2DModel":
            self.conditioning = "time_embedding"
            if unet.config.class_embed_type is not None or unet.class_embedding is None:
                raise ValueError("unet: a UNet2DModel must be class-conditional through num_class_embeds "
                                 "(class_embed_type=None)")
            # the class embedding becomes an input: the UNet adds whatever vector it is given
            unet.class_embedding = nn.Identity()
        else:
            raise ValueError(f"unet must be a diffusers UNet2DConditionModel or UNet2DModel, got {uname}")
        vae_in = vae.config.in_channels
        lat = vae.config.latent_channels
        if self.vae_kind == "vq" and vae.config.vq_embed_dim:
            lat = vae.config.vq_embed_dim
        if unet.config.in_channels != lat or unet.config.out_channels != lat:
            raise ValueError(f"unet in/out channels ({unet.config.in_channels}/{unet.config.out_channels}) "
                             f"do not match the VAE's {lat} latent channels")
        self.image_channels = int(vae_in)
        self.latent_channels = int(unet.config.in_channels)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        ss = unet.config.sample_size
        self.latent_size = int(ss[0] if isinstance(ss, (list, tuple)) else ss)
        self.scale_factor = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        pt = self.scheduler_config.get("prediction_type", "epsilon")
        if pt not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"scheduler: prediction_type {pt!r} is not supported")
        if self.scheduler_config.get("thresholding", False):
            raise ValueError("scheduler: dynamic thresholding is not supported (set thresholding=false)")
        from diffusers import DDIMScheduler  # deferred: diffusers is slow to import

        sched = DDIMScheduler.from_config(self.scheduler_config)
        self.register_buffer("alphas_cumprod", sched.alphas_cumprod.to(torch.float64).clone(),
                             persistent=False)
        self.final_alpha_cumprod = float(sched.final_alpha_cumprod)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    # keep the frozen model in eval mode whatever callers do
    def train(self, mode: bool = True) -> "ClassConditionalLDM":
        return super().train(False)

    @property
    def image_size(self) -> int:
        return self.latent_size * self.vae_factor

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    def make_scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config)

    # ---- the three networks ---------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] at the VAE's resolution and channels -> scaled latents (deterministic:
        the VQ encoder output before quantisation, as CompVis ``encode_first_stage``; the KL mode)."""
        if self.vae_kind == "vq":
            h = self.vae.encode(images).latents
        else:
            h = self.vae.encode(images).latent_dist.mode()
        return h * self.scale_factor

    def decode(self, latents: torch.Tensor, *, quantize: bool = True) -> torch.Tensor:
        """Scaled latents -> images in (about) [-1, 1]. A VQ decoder quantises first (straight-through
        gradient), as CompVis ``decode_first_stage`` does, unless ``quantize=False``."""
        z = latents / self.scale_factor
        if self.vae_kind == "vq":
            return self.vae.decode(z, force_not_quantize=not quantize).sample
        return self.vae.decode(z).sample

    def quantize(self, latents: torch.Tensor) -> torch.Tensor:
        """Nearest codebook entries of scaled latents (straight-through gradient); identity for KL."""
        if self.vae_kind != "vq":
            return latents
        z = latents / self.scale_factor
        zq = self.vae.quantize(z)[0]
        return zq * self.scale_factor

    def model_output(self, z: torch.Tensor, timestep: int, cond: torch.Tensor) -> torch.Tensor:
        """The denoiser's raw output at integer ``timestep`` for latents ``z`` (B, C, h, w) and class
        embeddings ``cond`` (B, D)."""
        t = torch.full((z.shape[0],), int(timestep), device=z.device, dtype=torch.long)
        if self.conditioning == "cross_attention":
            return self.unet(z, t, encoder_hidden_states=cond[:, None, :]).sample
        return self.unet(z, t, class_labels=cond).sample

    def embed(self, labels: torch.Tensor) -> torch.Tensor:
        return self.class_embedder(labels)

    def null_embedding(self) -> torch.Tensor | None:
        k = self.class_embedder.null_class
        if k is None:
            return None
        return self.class_embedder.embedding.weight[k]


def load_ldm(path: str | os.PathLike, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> ClassConditionalLDM:
    """Load a :class:`ClassConditionalLDM` from a local diffusers-format directory (see module doc).

    Raises ``FileNotFoundError`` for a missing directory or component and ``ValueError`` for a
    malformed one, both naming the file and what belongs there."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"LDM directory {root} does not exist; {LAYOUT_HELP}")
    if root.is_file():
        hint = ""
        if root.suffix in (".ckpt", ".pt", ".pth", ".safetensors"):
            hint = (f" It looks like a checkpoint file: convert it first with `splatdd convert-ldm {root} "
                    f"OUT_DIR --config MODEL.yaml` and pass OUT_DIR.")
        raise ValueError(f"{root} is a file, not an LDM directory.{hint} {LAYOUT_HELP}")
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel, VQModel

    vae_cfg = _read_json(root / "vae" / CONFIG_NAME, "vae")
    vae_cls = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}.get(vae_cfg.get("_class_name"))
    if vae_cls is None:
        raise ValueError(f"vae: {root / 'vae' / CONFIG_NAME} has _class_name "
                         f"{vae_cfg.get('_class_name')!r}; expected 'VQModel' or 'AutoencoderKL'. {LAYOUT_HELP}")
    unet_cfg = _read_json(root / "unet" / CONFIG_NAME, "unet")
    unet_cls = {"UNet2DConditionModel": UNet2DConditionModel,
                "UNet2DModel": UNet2DModel}.get(unet_cfg.get("_class_name"))
    if unet_cls is None:
        raise ValueError(f"unet: {root / 'unet' / CONFIG_NAME} has _class_name "
                         f"{unet_cfg.get('_class_name')!r}; expected 'UNet2DConditionModel' or 'UNet2DModel'. "
                         f"{LAYOUT_HELP}")
    sched_cfg = _read_json(root / "scheduler" / SCHEDULER_CONFIG_NAME, "scheduler")
    for key in ("beta_start", "beta_end", "beta_schedule"):
        if key not in sched_cfg and "trained_betas" not in sched_cfg:
            raise ValueError(f"scheduler: {root / 'scheduler' / SCHEDULER_CONFIG_NAME} lacks {key!r}")
    vae = _load_component(vae_cls, root / "vae", "vae")
    unet = _load_component(unet_cls, root / "unet", "unet")

    emb_dir = root / "class_embedder"
    if unet_cls is UNet2DConditionModel or emb_dir.exists():
        ecfg = _read_json(emb_dir / CONFIG_NAME, "class_embedder")
    else:
        ecfg = {}
    if unet_cls is UNet2DConditionModel:
        wfile = emb_dir / WEIGHTS_NAME
        if not wfile.is_file():
            raise FileNotFoundError(f"class_embedder: missing weights {wfile}; {LAYOUT_HELP}")
        from safetensors.torch import load_file

        try:
            sd = load_file(str(wfile))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"class_embedder: {wfile} is not a readable safetensors file ({e})") from e
        if "embedding.weight" not in sd or sd["embedding.weight"].ndim != 2:
            raise ValueError(f"class_embedder: {wfile} must hold a 2-D tensor 'embedding.weight', has "
                             f"{sorted(sd)}")
        w = sd["embedding.weight"]
    else:
        if unet.config.num_class_embeds is None:
            raise ValueError(f"unet: {root / 'unet'} is a UNet2DModel without num_class_embeds: "
                             "it is not class-conditional")
        w = unet.class_embedding.weight.detach().clone()
    try:
        embedder = ClassEmbedder(w.shape[0], w.shape[1], num_classes=ecfg.get("num_classes"),
                                 null_class=ecfg.get("null_class"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"class_embedder: {emb_dir / CONFIG_NAME}: {e}") from e
    with torch.no_grad():
        embedder.embedding.weight.copy_(w)
    ldm = ClassConditionalLDM(vae, unet, embedder, sched_cfg, path=str(root.resolve()),
                              config_hash=model_config_hash(root))
    return ldm.to(device=device, dtype=dtype)


def save_ldm(ldm_parts: dict[str, Any], path: str | os.PathLike, *, manifest: dict[str, Any] | None = None
             ) -> Path:
    """Write the directory layout from ``{"vae": VQModel|AutoencoderKL, "unet": ..., "scheduler": a
    diffusers scheduler, "class_embedder": ClassEmbedder}``. Used by the converter and the tiny model.

    ``class_embedder`` may be ``None`` for a ``UNet2DModel`` (then only its null row, if any, is recorded
    through ``null_class``/``num_classes`` in ``manifest``)."""
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    ldm_parts["vae"].save_pretrained(str(root / "vae"), safe_serialization=True)
    ldm_parts["unet"].save_pretrained(str(root / "unet"), safe_serialization=True)
    ldm_parts["scheduler"].save_pretrained(str(root / "scheduler"))
    emb = ldm_parts.get("class_embedder")
    if emb is not None:
        (root / "class_embedder").mkdir(exist_ok=True)
        context = "cross_attention" if type(ldm_parts["unet"]).__name__ == "UNet2DConditionModel" \
            else "time_embedding"
        with open(root / "class_embedder" / CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(emb.config_dict(context), f, indent=2, sort_keys=True)
        save_file({"embedding.weight": emb.embedding.weight.detach().contiguous().cpu()},
                  str(root / "class_embedder" / WEIGHTS_NAME))
    info = {"format": "splatdd-ld3m class-conditional LDM", "format_version": 1}
    info.update(manifest or {})
    with open(root / MANIFEST_NAME, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    return root
