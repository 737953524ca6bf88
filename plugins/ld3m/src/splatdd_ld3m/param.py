"""``ld3m``: a distilled dataset stored as LDM latents + class embeddings (LD3M, Algorithm 1).

Each distilled image ``i`` is a learnable latent ``Z_i`` (C x h x w, the LDM's latent shape) and a
learnable class embedding ``c_i`` (D). Decoding runs::

    z_T   = sqrt(a_T) Z + sqrt(1 - a_T) eps          (q(z_T | Z); eps drawn once per decode pass)
    z_t-1 = (1 - t/T) mu_theta(c, z_t, t) + (t/T) z_T (+ sigma_t noise)    t = T .. 1   (Eq. 7)
    x     = D(z_0)                                   (VAE decoder, [-1, 1])

then maps ``x`` to the dataset's channels, resolution and normalisation. The pretrained LDM is
frozen and NOT part of the stored dataset (as in the paper): ``num_bytes`` counts only Z and c.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from splatdd.plugin_api import (PLUGIN_API_VERSION, DatasetSpec, OptimizerSpec, Parameterization,
                                regime_setting)

from .sampling import (ddim_schedule, normalize_checkpointing, normalize_noise_term, normalize_residual,
                       reverse_process, run_checkpointed)

#: Environment variable that overrides the model path recorded in a distilled file (the config-hash
#: check still applies).
MODEL_ENV = "SPLATDD_LD3M_MODEL"

#: Learning rates by optimisation regime (:data:`splatdd.plugin_api.REGIMES`) for SGD with momentum
#: 0.5, shared by Z and c: the LD3M paper's (appendix C, its Table 9 and the released code's
#: ``torch.optim.SGD(..., momentum=0.5)``) for ``gradient`` (DC, 1e-3), ``distribution`` (DM, 1e-2)
#: and ``trajectory`` (MTT, 10). ``recover`` (SRe2L-style recovery; the paper has none) is our
#: choice: DM's 1e-2, the regime closest to it (both match a network's feature statistics).
PAPER_LR = {"gradient": 1e-3, "distribution": 1e-2, "trajectory": 10.0, "recover": 1e-2}
#: Our defaults for Adam (not from the paper: Adam's step is bounded by its lr, so MTT's 10 is not
#: usable there); ``recover`` also takes SRe2L's betas (0.5, 0.9).
ADAM_LR = {"gradient": 1e-3, "distribution": 1e-2, "trajectory": 1e-2, "recover": 1e-2}
ADAM_BETAS = {"recover": (0.5, 0.9)}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: What is learned: both Z and c (the paper's LD3M), or only c with Z frozen (Table 7's first row).
LEARN_MODES = ("both", "c")
#: How class embeddings start: the embedder's row of the class, or N(0, 1) noise (Table 8's noise row).
INIT_C_MODES = ("class", "noise")
_LUMA = (0.299, 0.587, 0.114)


class _Frozen:
    """Holds the frozen LDM outside the module tree: not in ``parameters()``/``state_dict()``, shared
    (not copied) by ``copy.deepcopy``; :meth:`LatentDiffusionImages._apply` moves it with the module."""

    __slots__ = ("ldm",)

    def __init__(self, ldm) -> None:
        self.ldm = ldm

    def __deepcopy__(self, memo):
        return self


def _resolve_model(model_path: str | os.PathLike | None, spec: DatasetSpec, tiny: Mapping[str, int] | None
                   ) -> tuple[str, dict[str, int] | None, Path]:
    """(recorded path, tiny settings or None, directory to load)."""
    from .tiny import default_tiny_path, tiny_spec_for

    if model_path is None or str(model_path) == "tiny":
        t = dict(tiny) if tiny else tiny_spec_for(spec.channels, spec.height, spec.width, spec.num_classes)
        return "tiny", t, default_tiny_path(**t)
    return str(model_path), None, Path(model_path).expanduser()


def default_steps(spec: DatasetSpec) -> int:
    """T from the resolution, as LD3M appendix C: 10 up to 128 px, 20 above (the paper's 256 px).

    >>> from splatdd.plugin_api import DatasetSpec
    >>> default_steps(DatasetSpec("x", 3, 128, 128, 10, (0.5,) * 3, (0.5,) * 3))
    10
    """
    return 10 if max(int(spec.height), int(spec.width)) <= 128 else 20


def _load(path: Path):
    from .ldm import load_ldm

    return load_ldm(path)


class LatentDiffusionImages(Parameterization):
    """Latent dataset distillation through a pretrained class-conditional LDM (LD3M)."""

    name = "ld3m"
    api_version = PLUGIN_API_VERSION

    def __init__(self, spec: DatasetSpec, ipc: int, ldm, *, settings: dict[str, Any]) -> None:
        super().__init__()
        if spec.zca:
            raise ValueError("ld3m decodes natural images and cannot produce ZCA-whitened ones: run it "
                             "without ZCA (zca=False)")
        if spec.channels not in (1, 3):
            raise ValueError(f"ld3m supports 1- or 3-channel datasets, got {spec.channels}")
        if ldm.image_channels not in (1, 3):
            raise ValueError(f"the LDM decodes {ldm.image_channels}-channel images; 1 or 3 are supported")
        self.spec = spec
        self.ipc = int(ipc)
        self._frozen = _Frozen(ldm)
        s = dict(settings)
        self.steps = int(s["steps"])
        self.guidance = float(s["guidance"])
        self.residual = normalize_residual(s["residual"])
        self.eta = float(s["eta"])
        self.noise_term = normalize_noise_term(s.get("noise_term", "sigma"))
        self.diffusion = bool(s.get("diffusion", True))
        self.learn = str(s.get("learn", "both"))
        if self.learn not in LEARN_MODES:
            raise ValueError(f"learn must be one of {LEARN_MODES}, got {self.learn!r}")
        if self.learn == "c" and not self.diffusion:
            raise ValueError("learn='c' (Z frozen) with diffusion=False (c unused) leaves nothing to learn: "
                             "use one of the two ablations")
        self.init_c = str(s.get("init_c", "class"))
        if self.init_c not in INIT_C_MODES:
            raise ValueError(f"init_c must be one of {INIT_C_MODES}, got {self.init_c!r}")
        self.budget_override = bool(s.get("budget_override", False))
        self.checkpointing = normalize_checkpointing(s["checkpointing"])
        self.quantize = bool(s["quantize"])
        self.clamp = bool(s["clamp"])
        self.noise = str(s["noise"])
        if self.noise not in ("per_pass", "fixed"):
            raise ValueError(f"noise must be 'per_pass' or 'fixed', got {self.noise!r}")
        self.noise_seed = int(s["noise_seed"])
        self.storage_dtype = str(s["storage_dtype"])
        if self.storage_dtype not in _DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(_DTYPES)}, got {self.storage_dtype!r}")
        self.optimizer = str(s["optimizer"]).lower()
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        self.model_path = str(s["model_path"])
        self.tiny = s.get("tiny")
        self.latent_size = int(s["latent_size"] or ldm.latent_size)
        if self.guidance != 1.0 and ldm.null_embedding() is None:
            raise ValueError("this LDM has no null class embedding, so classifier-free guidance is "
                             "impossible: use guidance=1")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        k = spec.num_classes
        cm = s.get("class_map")
        self.class_map = list(range(k)) if cm is None else [int(x) for x in cm]
        if len(self.class_map) != k:
            raise ValueError(f"class_map has {len(self.class_map)} entries for {k} classes")
        bad = [x for x in self.class_map if not 0 <= x < ldm.class_embedder.num_classes]
        if bad:
            raise ValueError(f"class_map entries {bad[:5]} are not classes of the LDM "
                             f"(0 .. {ldm.class_embedder.num_classes - 1}); pass class_map=[...] with the LDM "
                             "class index of each dataset class (e.g. ImageNet ids for an ImageNet subset)")
        n = k * self.ipc
        self.register_buffer("_labels", torch.arange(k).repeat_interleave(self.ipc), persistent=False)
        self.register_buffer("noise_pass", torch.zeros((), dtype=torch.long))
        C, h = ldm.latent_channels, self.latent_size
        self.latents = torch.nn.Parameter(torch.zeros(n, C, h, h))
        self.class_embeddings = torch.nn.Parameter(torch.zeros(n, ldm.class_embedder.embed_dim))
        if self.learn == "c":
            self.latents.requires_grad_(False)          # Table 7, "c only": Z frozen
        sched = ldm.make_scheduler()
        self._schedule = ddim_schedule(sched, self.steps, eta=self.eta)
        self._prediction_type = ldm.scheduler_config.get("prediction_type", "epsilon")
        clip = ldm.scheduler_config.get("clip_sample", False)
        self._clip = float(ldm.scheduler_config.get("clip_sample_range", 1.0)) if clip else None
        self._fixed_noise: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def quick_options(cls, spec: DatasetSpec, ipc: int, workdir: str | os.PathLike) -> dict[str, Any]:
        """For other plugins' quick tests: a tiny random-weight LDM built once under ``workdir``,
        T = 2, 2x2 latents (within a tiny budget), fixed noise, no quantisation."""
        from .tiny import build_tiny_ldm, tiny_spec_for

        settings = tiny_spec_for(spec.channels, spec.height, spec.width, spec.num_classes)
        path = Path(workdir) / ("ld3m-tiny-" + "-".join(f"{k}{v}" for k, v in sorted(settings.items())))
        if not (path / "unet" / "config.json").is_file():
            build_tiny_ldm(path, **settings)
        return {"model_path": str(path), "steps": 2, "latent_size": 2, "noise": "fixed", "quantize": False}

    @classmethod
    def build(cls, spec: DatasetSpec, ipc: int, *, generator: torch.Generator | None = None,
              model_path: str | os.PathLike | None = "tiny", steps: int | None = None,
              guidance: float = 3.0, residual: bool | str = True, eta: float = 0.0,
              noise_term: str = "sigma", checkpointing: bool | str = True,
              quantize: bool = True, clamp: bool = True, noise: str = "per_pass",
              noise_seed: int | None = None, storage_dtype: str = "float32", optimizer: str = "sgd",
              class_map: list[int] | None = None, latent_size: int | None = None,
              diffusion: bool = True, learn: str = "both", init_c: str = "class",
              budget_override: bool = False) -> "LatentDiffusionImages":
        """``ipc`` latents (+ class embeddings) per class. Options:

        - ``model_path``: diffusers-format LDM directory (see :mod:`splatdd_ld3m.ldm`); ``"tiny"``
          (default) auto-builds a tiny RANDOM-weight model for demos and tests.
        - ``steps`` T (default from the dataset resolution: 10 up to 128 px, 20 above, as the
          paper's appendix C), ``guidance`` (CFG scale, paper 3),
          ``residual`` (True = Eq. 7, False = plain DDIM, ``"x0"`` = the released code's variant),
          ``eta`` (DDIM noise; 0 = deterministic, as the released code; > 0 = the paper's stochastic
          Algorithm 1), ``noise_term`` (``"sigma"``: DDIM's ``sigma_t eps_t``; ``"sigma_squared"``:
          the paper's literal ``sigma_t^2 eps_t``), ``checkpointing`` (per UNet call and VAE decode: True =
          ``"nonreentrant"``, ``"reentrant"`` (flat memory in T, ``.backward()`` only), False).
        - ``quantize`` (VQ decode quantises, as CompVis), ``clamp`` (decoded images clamped to the
          valid range, as the released code; gradients stop at clamped pixels).
        - ``noise``: ``"per_pass"`` (z_T's noise drawn anew for every decode, as the paper) or
          ``"fixed"`` (one draw per image, kept); ``noise_seed`` seeds it (default: from ``generator``).
        - ``storage_dtype`` of the saved tensors; ``optimizer`` ``"sgd"`` (paper) or ``"adam"``;
          ``class_map`` (LDM class of each dataset class; default identity); ``latent_size``
          (default: the LDM's).
        - Ablations: ``diffusion=False`` decodes Z directly through the autoencoder (Table 6, "w/o
          diffusion"; c is then neither used nor stored); ``learn="c"`` freezes Z (Table 7, "c
          only"); ``init_c="noise"`` starts c from N(0, 1) instead of the class row (with ``--init
          noise``: Table 8's noise initialisation of both Z and c); ``budget_override=True`` lets a
          run exceed the pixel budget (the paper's CIFAR-10 runs), recorded in :meth:`config`.

        Latents start as N(0, 1) noise (from ``generator``) and class embeddings as the embedder's
        row of each image's class; :meth:`init_from_real` encodes real images instead (paper 4.2)."""
        if int(ipc) < 1:
            raise ValueError(f"ipc must be >= 1, got {ipc}")
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        recorded, tiny, path = _resolve_model(model_path, spec, None)
        if recorded == "tiny":
            warnings.warn("ld3m: model_path='tiny' uses a tiny LDM with RANDOM weights (a demo/test model); "
                          "pass model_path=DIR of a pretrained LDM for real distillation", stacklevel=2)
        ldm = _load(path)
        if noise_seed is None:
            noise_seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen).item())
        if steps is None:
            steps = default_steps(spec)
        settings = dict(model_path=recorded, tiny=tiny, steps=steps, guidance=guidance, residual=residual,
                        eta=eta, noise_term=noise_term, checkpointing=checkpointing, quantize=quantize,
                        clamp=clamp, noise=noise, noise_seed=noise_seed, storage_dtype=storage_dtype,
                        optimizer=optimizer, class_map=class_map, latent_size=latent_size,
                        diffusion=diffusion, learn=learn, init_c=init_c, budget_override=budget_override)
        self = cls(spec, ipc, ldm, settings=settings)
        with torch.no_grad():
            z = torch.randn(self.latents.shape, generator=gen, device="cpu")
            self.latents.copy_(z)
            if self.init_c == "noise":
                self.class_embeddings.copy_(torch.randn(self.class_embeddings.shape, generator=gen))
            else:
                self.class_embeddings.copy_(self._class_init(self._labels))
        return self

    @property
    def ldm(self):
        """The frozen LDM (not a submodule; moved along by ``.to()``)."""
        return self._frozen.ldm

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .float() ... move the LDM too
        super()._apply(fn, recurse)
        self._frozen.ldm._apply(fn, recurse)
        self._fixed_noise = None
        return self

    def _class_init(self, labels: torch.Tensor) -> torch.Tensor:
        cm = torch.tensor(self.class_map, dtype=torch.long, device=labels.device)
        with torch.no_grad():
            w = self.ldm.class_embedder.embedding.weight
            return w[cm[labels.long()].to(w.device)].detach().to(self.class_embeddings.dtype)

    # ---- image space conversions ----------------------------------------------------------------
    def _stats(self, device, dtype):
        C = self.spec.channels
        mean = torch.tensor(self.spec.mean if self.spec.mean else (0.0,) * C, device=device, dtype=dtype)
        std = torch.tensor(self.spec.std if self.spec.std else (1.0,) * C, device=device, dtype=dtype)
        if mean.numel() != C or std.numel() != C:
            raise ValueError(f"spec.mean/std must have {C} entries, got {tuple(self.spec.mean)} / "
                             f"{tuple(self.spec.std)}")
        return mean.view(1, C, 1, 1), std.view(1, C, 1, 1)

    @staticmethod
    def _convert_channels(x: torch.Tensor, c_out: int) -> torch.Tensor:
        c_in = x.shape[1]
        if c_in == c_out:
            return x
        if c_in == 3 and c_out == 1:
            w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            return (x * w).sum(1, keepdim=True)
        if c_in == 1 and c_out == 3:
            return x.expand(-1, 3, -1, -1)
        raise ValueError(f"cannot convert {c_in} channels to {c_out}")

    @staticmethod
    def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=down)

    def to_dataset_space(self, x: torch.Tensor, resolution: tuple[int, int] | None = None) -> torch.Tensor:
        """LDM decoder output in [-1, 1] -> dataset channels, resolution and normalisation."""
        x = (x + 1.0) * 0.5
        if self.clamp:
            x = x.clamp(0.0, 1.0)
        x = self._convert_channels(x, self.spec.channels)
        x = self._resize(x, tuple(resolution) if resolution is not None else self.spec.resolution)
        mean, std = self._stats(x.device, x.dtype)
        return (x - mean) / std

    def to_ldm_space(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised dataset images -> [-1, 1] at the LDM's channels and image resolution."""
        mean, std = self._stats(images.device, images.dtype)
        x = images * std + mean
        x = self._convert_channels(x, self.ldm.image_channels)
        s = self.latent_size * self.ldm.vae_factor
        x = self._resize(x, (s, s))
        return x * 2.0 - 1.0

    # ---- the contract ---------------------------------------------------------------------------
    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    @torch.no_grad()
    def init_from_real(self, images: torch.Tensor, labels: torch.Tensor, *, steps: int | None = None,
                       progress: bool = False) -> dict[str, float]:
        """Z = E(x) for one real image per stored item (paper 4.2); c = the embedder's row of its class
        (left as built when ``init_c="noise"``).

        ``steps`` is unused (encoding needs no fitting). Returns the autoencoder's reconstruction MSE
        in the dataset's normalised space and the latents' mean/std."""
        n = len(self._labels)
        if images.shape[0] != n or labels.shape[0] != n:
            raise ValueError(f"init_from_real needs {n} images and labels (one per stored item), got "
                             f"{images.shape[0]} / {labels.shape[0]}")
        if not torch.equal(labels.to("cpu").long(), self._labels.to("cpu")):
            raise ValueError("init_from_real: labels must equal self.labels (class-major, ipc per class)")
        dev = self.latents.device
        zs, mse = [], 0.0
        for i in range(0, n, 32):
            x = images[i:i + 32].to(dev, torch.float32)
            z = self.ldm.encode(self.to_ldm_space(x))
            rec = self.to_dataset_space(self.ldm.decode(z, quantize=self.quantize), tuple(x.shape[-2:]))
            mse += float(((rec - x) ** 2).sum())
            zs.append(z)
        z = torch.cat(zs)
        if tuple(z.shape[1:]) != tuple(self.latents.shape[1:]):
            raise ValueError(f"encoded latents have shape {tuple(z.shape[1:])}, expected "
                             f"{tuple(self.latents.shape[1:])}")
        self.latents.copy_(z)
        if self.init_c == "class":
            self.class_embeddings.copy_(self._class_init(self._labels.to(dev)))
        self._fixed_noise = None
        return {"ae_mse": mse / images.numel(), "latent_mean": float(z.mean()), "latent_std": float(z.std())}

    def _noises(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(noise for z_T, per-step noises or None) for the images ``idx`` of this decode pass.

        Drawn on the CPU from seeded generators (same numbers on any device)."""
        shape = tuple(self.latents.shape[1:])
        dev, dt = self.latents.device, self.latents.dtype
        need_steps = self.eta > 0
        if self.noise == "fixed":
            if self._fixed_noise is None:
                g = torch.Generator().manual_seed(self.noise_seed)
                n = self.latents.shape[0]
                eps = torch.randn((n,) + shape, generator=g)
                st = torch.randn((self.steps, n) + shape, generator=g) if need_steps else None
                self._fixed_noise = (eps.to(dev, dt), None if st is None else st.to(dev, dt))
            eps, st = self._fixed_noise
            return eps[idx], (None if st is None else [st[k][idx] for k in range(self.steps)])
        count = int(self.noise_pass.item())
        self.noise_pass += 1
        g = torch.Generator().manual_seed((self.noise_seed * 1_000_003 + count) % (2 ** 63 - 1))
        m = idx.numel()
        eps = torch.randn((m,) + shape, generator=g).to(dev, dt)
        st = None
        if need_steps:
            st = [torch.randn((m,) + shape, generator=g).to(dev, dt) for _ in range(self.steps)]
        return eps, st

    def latents_to_z0(self, idx: torch.Tensor) -> torch.Tensor:
        """Z[idx], c[idx] -> z_0 through the (modified) reverse process; Z[idx] itself when
        ``diffusion=False`` (Table 6's "w/o diffusion": no noise, no denoiser, c unused)."""
        Z = self.latents[idx]
        if not self.diffusion:
            return Z
        c = self.class_embeddings[idx]
        eps, st = self._noises(idx)
        a_T = self._schedule[0].alpha
        z_T = math.sqrt(a_T) * Z + math.sqrt(1.0 - a_T) * eps
        z_ref = self.ldm.quantize(Z) if self.residual == "x0" else None
        return reverse_process(self.ldm, z_T, c, self._schedule, guidance=self.guidance, residual=self.residual,
                               prediction_type=self._prediction_type,
                               step_noise=(lambda k: st[k]) if st is not None else None,
                               z_ref=z_ref, clip_sample=self._clip,
                               checkpointing=self.checkpointing, noise_term=self.noise_term)

    def decode(self, indices: torch.Tensor | None = None, *,
               resolution: tuple[int, int] | None = None) -> torch.Tensor:
        n = self.latents.shape[0]
        dev = self.latents.device
        if indices is None:
            idx = torch.arange(n, device=dev)
        else:
            idx = torch.as_tensor(indices, device=dev).long().flatten()
            if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
                raise IndexError(f"decode: indices out of range for {n} images")
        if idx.numel() == 0:
            h, w = resolution if resolution is not None else self.spec.resolution
            return self.latents.new_zeros((0, self.spec.channels, h, w))
        z0 = self.latents_to_z0(idx)
        x = run_checkpointed(self._decode_latents, z0, mode=self.checkpointing)
        return self.to_dataset_space(x, resolution)

    def _decode_latents(self, z0: torch.Tensor) -> torch.Tensor:
        return self.ldm.decode(z0, quantize=self.quantize)

    def optimizer_spec(self, regime: str, lr: float | None = None) -> OptimizerSpec:
        """SGD (momentum 0.5) with the paper's lr for ``regime`` (gradient 1e-3, distribution 1e-2,
        trajectory 10; recover 1e-2, ours), the same for Z and c; ``optimizer="adam"`` uses Adam with
        :data:`ADAM_LR` (and :data:`ADAM_BETAS`). An unknown regime raises ``ValueError``."""
        table = PAPER_LR if self.optimizer == "sgd" else ADAM_LR
        default = regime_setting(table, regime, "ld3m")
        lr = float(lr) if lr is not None else default
        groups = [{"params": [self.latents], "lr": lr}, {"params": [self.class_embeddings], "lr": lr}]
        betas = ADAM_BETAS.get(regime) if self.optimizer == "adam" else None
        return OptimizerSpec(params=groups, kind=self.optimizer, momentum=0.5, betas=betas)

    # ---- storage --------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Z and c in ``storage_dtype``; only Z when ``diffusion=False`` (c plays no part)."""
        dt = _DTYPES[self.storage_dtype]
        out = {"latents": self.latents.detach().to("cpu", dt).contiguous()}
        if self.diffusion:
            out["class_embeddings"] = self.class_embeddings.detach().to("cpu", dt).contiguous()
        return out

    def num_bytes(self) -> int:
        """Bytes of the stored latents and class embeddings (the LDM itself is not counted; without
        diffusion only the latents)."""
        item = torch.empty((), dtype=_DTYPES[self.storage_dtype]).element_size()
        n = self.latents.numel() + (self.class_embeddings.numel() if self.diffusion else 0)
        return n * item

    def pixel_budget_ratio(self) -> float:
        """``num_bytes()`` over the pixel budget of ``ipc`` fp32 images per class (> 1: over budget)."""
        from splatdd.budget import budget_bytes

        return self.num_bytes() / budget_bytes(self.spec, self.ipc)

    def config(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "model_config_hash": self.ldm.config_hash,
                "tiny": self.tiny, "ipc": self.ipc, "num_classes": self.spec.num_classes,
                "steps": self.steps, "guidance": self.guidance, "residual": self.residual, "eta": self.eta,
                "noise_term": self.noise_term, "diffusion": self.diffusion, "learn": self.learn,
                "init_c": self.init_c, "budget_override": self.budget_override,
                "pixel_budget_ratio": self.pixel_budget_ratio(),
                "checkpointing": self.checkpointing, "quantize": self.quantize, "clamp": self.clamp,
                "noise": self.noise, "noise_seed": self.noise_seed, "storage_dtype": self.storage_dtype,
                "optimizer": self.optimizer, "class_map": list(self.class_map),
                "latent_size": self.latent_size, "latent_shape": list(self.latents.shape[1:]),
                "embed_dim": int(self.class_embeddings.shape[1])}

    @classmethod
    def from_state(cls, spec: DatasetSpec, tensors: Mapping[str, torch.Tensor],
                   config: Mapping[str, Any]) -> "LatentDiffusionImages":
        """Rebuild from :meth:`state_tensors` + :meth:`config`. The LDM is loaded from the recorded
        ``model_path`` (or ``$SPLATDD_LD3M_MODEL``); its config hash must match the recorded one."""
        for key in ("model_path", "ipc", "steps", "guidance", "residual", "noise_seed", "latent_shape",
                    "embed_dim"):
            if key not in config:
                raise ValueError(f"ld3m config lacks {key!r}")
        diffusion = bool(config.get("diffusion", True))
        for key in ("latents", "class_embeddings") if diffusion else ("latents",):
            if key not in tensors:
                raise ValueError(f"ld3m state lacks tensor {key!r}")
        override = os.environ.get(MODEL_ENV)
        if override:
            recorded, tiny, path = str(config["model_path"]), config.get("tiny"), Path(override).expanduser()
        else:
            recorded, tiny, path = _resolve_model(config["model_path"], spec, config.get("tiny"))
        ldm = _load(path)
        want = config.get("model_config_hash")
        if want and ldm.config_hash != want:
            raise ValueError(f"the LDM at {path} (config hash {ldm.config_hash[:12]}) is not the one this "
                             f"dataset was distilled with (hash {str(want)[:12]}, model_path "
                             f"{config['model_path']!r}); point ${MODEL_ENV} at the right model directory")
        settings = {k: config.get(k, d) for k, d in dict(
            steps=10, guidance=3.0, residual="eq7", eta=0.0, noise_term="sigma", checkpointing=True,
            quantize=True, clamp=True, noise="per_pass", storage_dtype="float32", optimizer="sgd",
            class_map=None, latent_size=None, diffusion=True, learn="both", init_c="class",
            budget_override=False).items()}
        settings.update(model_path=recorded, tiny=tiny, noise_seed=int(config["noise_seed"]))
        self = cls(spec, int(config["ipc"]), ldm, settings=settings)
        lat = tensors["latents"]
        emb = tensors["class_embeddings"] if diffusion else self.class_embeddings.detach()
        if tuple(lat.shape) != tuple(self.latents.shape):
            raise ValueError(f"tensor 'latents' has shape {tuple(lat.shape)}, expected "
                             f"{tuple(self.latents.shape)} (ipc {self.ipc} x {spec.num_classes} classes, "
                             f"latent {tuple(self.latents.shape[1:])})")
        if tuple(emb.shape) != tuple(self.class_embeddings.shape):
            raise ValueError(f"tensor 'class_embeddings' has shape {tuple(emb.shape)}, expected "
                             f"{tuple(self.class_embeddings.shape)}")
        with torch.no_grad():
            self.latents.copy_(lat.to(torch.float32))
            self.class_embeddings.copy_(emb.to(torch.float32))
        return self

    def extra_repr(self) -> str:
        return (f"n={self.latents.shape[0]}, latent={tuple(self.latents.shape[1:])}, "
                f"embed={self.class_embeddings.shape[1]}, T={self.steps}, guidance={self.guidance}, "
                f"residual={self.residual}, eta={self.eta}, diffusion={self.diffusion}, learn={self.learn}, "
                f"model={self.model_path!r}")

