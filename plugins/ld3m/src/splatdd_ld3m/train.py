"""Training a small class-conditional latent diffusion model (``splatdd train-ldm``).

No pretrained LDM can be downloaded here, so this trains one on a dataset splatdd loads
(FashionMNIST by default) from diffusers components, in three phases:

1. ``ae``: an ``AutoencoderKL`` (downsampling factor 4, ``latent_channels`` channels) on the images
   in [-1, 1] at ``image_size`` px; loss L1 + ``kl_weight`` KL (no perceptual or GAN term).
2. ``encode``: the train set is encoded once (posterior mode, as :meth:`ClassConditionalLDM.encode`);
   the VAE's ``scaling_factor`` is set to 1 / std of those latents (as Stable Diffusion's 0.18215).
3. ``unet``: a ``UNet2DModel`` with ``num_class_embeds = K + 1`` (row ``K`` is the null class for
   classifier-free guidance; labels are dropped to it with probability ``label_dropout``) learns to
   predict the noise on the cached latents, ``DDPMScheduler.add_noise`` with the cin256 noise schedule
   (betas 0.0015..0.0195, "scaled_linear", 1000 steps); Adam, linear warm-up then cosine decay, and an
   exponential moving average (EMA) of the weights, which is what is saved.

The result is the directory layout :func:`splatdd_ld3m.ldm.load_ldm` reads (``vae/``, ``unet/``,
``scheduler/`` with a DDIM config, ``class_embedder/``, ``splatdd_ld3m.json``), so
``--param-opt model_path=DIR`` uses it.

Resumable: every ``checkpoint_every`` steps (and at every phase change) the whole state -- phase,
step, weights, optimiser, EMA, the data/noise generator -- is written atomically to
``WORK_DIR/checkpoint.pt``; a rerun with the same arguments continues from it, bit-exactly. Sample
grids (one row per class, class names, a title with the step) go to ``WORK_DIR/samples/``.

Example::

    from splatdd_ld3m.train import TrainLDMConfig, train_ldm
    train_ldm(TrainLDMConfig(out_dir="ldm-fmnist", unet_steps=6000))
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .ldm import ClassEmbedder, save_ldm
from .tiny import CIN_SCHEDULE

#: Class names for the sample grids (other datasets: "class k").
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple(str(k) for k in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


@dataclass
class TrainLDMConfig:
    """Settings of :func:`train_ldm` (all recorded in the model's ``splatdd_ld3m.json``).

    The defaults are sized for FashionMNIST on one CPU core: the UNet phase ran at 3.2 steps/s with
    1 thread at load average ~3-4 (1500 steps in about 8 minutes), far slower on a busier machine
    (see ``scripts/train_ldm.sh`` and docs/ld3m.md)."""

    out_dir: str
    work_dir: str | None = None          # checkpoint + sample grids; default OUT_DIR.work
    dataset: str = "fashion_mnist"
    data_root: str | None = None
    image_size: int = 32                 # the LDM's decoded resolution (multiple of 4)
    latent_channels: int = 4
    ae_channels: tuple[int, ...] = (16, 32, 32)
    unet_channels: tuple[int, ...] = (32, 64, 64)
    ae_steps: int = 300
    ae_batch_size: int = 64
    ae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 1500
    unet_batch_size: int = 128
    unet_lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.995
    label_dropout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 250
    sample_every: int = 500
    sample_steps: int = 25               # DDIM steps for the grids
    sample_guidance: float = 2.0
    samples_per_class: int = 8
    max_train_images: int | None = None  # use only the first N train images (tests)
    stop_unet_at: int | None = None      # write the model after this many UNet steps of the schedule

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if self.image_size < 8 or self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 and >= 8, got {self.image_size}")
        for name in ("latent_channels", "ae_batch_size", "unet_batch_size", "checkpoint_every",
                     "sample_every", "sample_steps", "samples_per_class"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("ae_steps", "unet_steps", "warmup_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        for name in ("ae_lr", "unet_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not 0.0 <= self.kl_weight < 1.0:
            raise ValueError(f"kl_weight must be in [0, 1), got {self.kl_weight}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.sample_guidance < 0:
            raise ValueError(f"sample_guidance must be >= 0, got {self.sample_guidance}")
        if len(self.ae_channels) < 3 or len(self.unet_channels) < 2:
            raise ValueError("ae_channels needs 3 levels (factor 4), unet_channels at least 2")
        for name, m in (("ae_channels", 8), ("unet_channels", 16)):
            chans = getattr(self, name)
            if any(c < m or c % m for c in chans):
                raise ValueError(f"{name} must be multiples of {m} (group norm), got {tuple(chans)}")
        if self.stop_unet_at is not None and not 1 <= self.stop_unet_at <= self.unet_steps:
            raise ValueError(f"stop_unet_at must be in 1..unet_steps={self.unet_steps}, got {self.stop_unet_at}")
        if self.max_train_images is not None and self.max_train_images < 1:
            raise ValueError(f"max_train_images must be >= 1, got {self.max_train_images}")

    def settings(self) -> dict[str, Any]:
        """The settings that define the model (paths and logging cadence excluded)."""
        d = dataclasses.asdict(self)
        for k in ("out_dir", "work_dir", "data_root", "checkpoint_every", "sample_every", "stop_unet_at"):
            d.pop(k)
        d["ae_channels"], d["unet_channels"] = list(self.ae_channels), list(self.unet_channels)
        return d


# ---- models ---------------------------------------------------------------------------------------
def make_autoencoder(cfg: TrainLDMConfig, channels: int):
    """The KL autoencoder (factor 4: three encoder levels)."""
    from diffusers import AutoencoderKL

    n = len(cfg.ae_channels)
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=cfg.latent_channels,
                         block_out_channels=tuple(cfg.ae_channels), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         norm_num_groups=8, sample_size=cfg.image_size, mid_block_add_attention=False,
                         scaling_factor=1.0)


def make_unet(cfg: TrainLDMConfig, num_classes: int):
    """The class-conditional UNet (class embedding added to the time embedding; attention at level 2)."""
    from diffusers import UNet2DModel

    n = len(cfg.unet_channels)
    down = tuple("AttnDownBlock2D" if i == 1 else "DownBlock2D" for i in range(n))
    up = tuple(reversed(tuple("AttnUpBlock2D" if i == 1 else "UpBlock2D" for i in range(n))))
    return UNet2DModel(sample_size=cfg.image_size // 4, in_channels=cfg.latent_channels,
                       out_channels=cfg.latent_channels, block_out_channels=tuple(cfg.unet_channels),
                       layers_per_block=1, down_block_types=down, up_block_types=up,
                       num_class_embeds=num_classes + 1, norm_num_groups=16, attention_head_dim=16)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


# ---- sampling (plain DDIM with classifier-free guidance, for the grids and the evaluation) -------
@torch.no_grad()
def sample_images(vae, unet, labels: torch.Tensor, *, null_class: int, latent_shape: tuple[int, int, int],
                  scaling_factor: float, steps: int = 25, guidance: float = 2.0, eta: float = 0.0,
                  generator: torch.Generator | None = None, batch_size: int = 100) -> torch.Tensor:
    """Class-conditional samples in [-1, 1] from raw diffusers parts (``UNet2DModel`` taking class
    indices). ``guidance`` 1 = conditional only; 0 = unconditional.

    Example: ``x = sample_images(vae, unet, torch.arange(10), null_class=10, latent_shape=(4, 8, 8),
    scaling_factor=s)``."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**CIN_SCHEDULE)
    sched.set_timesteps(steps)
    out = []
    for lab in labels.split(batch_size):
        z = torch.randn((lab.shape[0], *latent_shape), generator=generator)
        null = torch.full_like(lab, null_class)
        for t in sched.timesteps:
            tt = torch.full((lab.shape[0],), int(t), dtype=torch.long)
            if guidance == 1.0:
                eps = unet(z, tt, class_labels=lab).sample
            else:
                both = unet(torch.cat([z, z]), torch.cat([tt, tt]), class_labels=torch.cat([null, lab])).sample
                e_u, e_c = both.chunk(2)
                eps = e_u + guidance * (e_c - e_u)
            z = sched.step(eps, t, z, eta=eta, generator=generator).prev_sample
        out.append(vae.decode(z / scaling_factor).sample.clamp(-1, 1))
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: str | os.PathLike, *, class_names: list[str], per_class: int,
              title: str) -> None:
    """PNG of ``images`` in [-1, 1] laid out class-major (one row per class, its name on the left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from splatdd.io_utils import atomic_save_with

    k = len(class_names)
    x = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    fig, axes = plt.subplots(k, per_class, figsize=(per_class * 0.9 + 1.2, k * 0.9 + 0.5), squeeze=False)
    for c in range(k):
        for j in range(per_class):
            ax = axes[c][j]
            img = x[c * per_class + j]
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(class_names[c], rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_save_with(path, lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)


# ---- the training loop ------------------------------------------------------------------------------
class _Progress:
    """One line per ``every`` steps with the rate and the remaining time of the phase."""

    def __init__(self, phase: str, start: int, total: int, log: Callable[[str], None], every: int) -> None:
        self.phase, self.start, self.total, self.log, self.every = phase, start, total, log, every
        self.t0 = time.monotonic()

    def __call__(self, step: int, loss: float) -> None:
        done = step + 1
        if done % self.every and done != self.total:
            return
        dt = time.monotonic() - self.t0
        rate = (done - self.start) / dt if dt > 0 else float("nan")
        eta = (self.total - done) / rate if rate and rate > 0 else float("nan")
        eta_txt = f"{int(eta // 60)}m{int(eta % 60):02d}s" if math.isfinite(eta) else "?"
        self.log(f"[{self.phase}] step {done}/{self.total} loss {loss:.5f} {rate:.2f} it/s ETA {eta_txt}")


def _load_images(cfg: TrainLDMConfig):
    from splatdd.data import load_dataset

    train, _ = load_dataset(cfg.dataset, cfg.data_root, resolution=cfg.image_size, progress=False)
    spec = train.spec
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    x = train.images
    y = train.labels
    if cfg.max_train_images is not None:
        x, y = x[:cfg.max_train_images], y[:cfg.max_train_images]
    x = (x * std + mean).clamp(0, 1) * 2 - 1          # back to [-1, 1]
    return x.contiguous(), y.long().contiguous(), spec


def _class_names(spec) -> list[str]:
    names = CLASS_NAMES.get(spec.name)
    if names is None or len(names) != spec.num_classes:
        return [f"class {k}" for k in range(spec.num_classes)]
    return list(names)


def _loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the platform has none), for timing records."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)
        for be, bm in zip(ema.buffers(), model.buffers()):
            be.copy_(bm)


def train_ldm(cfg: TrainLDMConfig, *, log: Callable[[str], None] | None = None, overwrite: bool = False,
              log_every: int = 50) -> Path:
    """Train (or resume) and write the LDM directory ``cfg.out_dir``; returns its path.

    Example: ``train_ldm(TrainLDMConfig(out_dir="ldm-fmnist"))`` then
    ``splatdd distill --param ld3m --param-opt model_path=ldm-fmnist ...``."""
    from splatdd.io_utils import atomic_torch_save, atomic_write_json

    cfg.validate()
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(cfg.out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite and not _is_early_export(out, cfg.settings()):
        raise FileExistsError(f"out_dir {out} exists and is not empty (pass overwrite=True / --overwrite)")
    work = Path(cfg.work_dir) if cfg.work_dir else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / CHECKPOINT_NAME

    x, y, spec = _load_images(cfg)
    k = spec.num_classes
    names = _class_names(spec)
    channels = spec.channels
    settings = cfg.settings()

    with torch.random.fork_rng(devices=[]):   # seeded parameter init, global RNG left as it was
        torch.manual_seed(cfg.seed)
        vae = make_autoencoder(cfg, channels)
        unet = make_unet(cfg, k)
    ema = copy.deepcopy(unet).requires_grad_(False)
    ae_opt = torch.optim.Adam(vae.parameters(), lr=cfg.ae_lr)
    unet_opt = torch.optim.Adam(unet.parameters(), lr=cfg.unet_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    state: dict[str, Any] = {"phase": "ae", "step": 0, "scaling_factor": 1.0, "latents": None,
                             "history": []}

    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{ckpt_path}: unknown checkpoint format {ck.get('format')!r}")
        if ck["settings"] != settings:
            diff = sorted(key for key in settings if ck["settings"].get(key) != settings[key])
            raise ValueError(f"{ckpt_path} was written with other settings ({', '.join(diff)}); use the "
                             f"same arguments to resume, or another --work-dir")
        vae.load_state_dict(ck["vae"])
        unet.load_state_dict(ck["unet"])
        ema.load_state_dict(ck["ema"])
        ae_opt.load_state_dict(ck["ae_opt"])
        unet_opt.load_state_dict(ck["unet_opt"])
        gen.set_state(ck["generator"])
        state = ck["state"]
        log(f"resumed from {ckpt_path}: phase {state['phase']}, step {state['step']}")

    def save_checkpoint() -> None:
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "settings": settings, "vae": vae.state_dict(),
                           "unet": unet.state_dict(), "ema": ema.state_dict(), "ae_opt": ae_opt.state_dict(),
                           "unet_opt": unet_opt.state_dict(), "generator": gen.get_state(), "state": state},
                          ckpt_path)

    n = x.shape[0]
    lat_shape = (cfg.latent_channels, cfg.image_size // 4, cfg.image_size // 4)
    per = cfg.samples_per_class
    grid_labels = torch.arange(k).repeat_interleave(per)

    def grid(tag: str) -> None:
        g = torch.Generator().manual_seed(cfg.seed + 1)     # same noise for every grid: comparable
        imgs = sample_images(vae, ema, grid_labels, null_class=k, latent_shape=lat_shape,
                             scaling_factor=state["scaling_factor"], steps=cfg.sample_steps,
                             guidance=cfg.sample_guidance, generator=g)
        path = work / "samples" / f"{tag}.png"
        save_grid(imgs, path, class_names=names, per_class=per,
                  title=f"LDM samples ({spec.name}), {tag}, DDIM {cfg.sample_steps} steps, "
                        f"guidance {cfg.sample_guidance:g}")
        log(f"wrote {path}")

    # phase 1: autoencoder
    if state["phase"] == "ae":
        vae.train()
        prog = _Progress("ae", state["step"], cfg.ae_steps, log, log_every)
        while state["step"] < cfg.ae_steps:
            s = state["step"]
            for g_ in ae_opt.param_groups:
                g_["lr"] = cfg.ae_lr * _lr_factor(s, cfg.ae_steps, 0)
            idx = torch.randint(0, n, (cfg.ae_batch_size,), generator=gen)
            xb = x[idx]
            post = vae.encode(xb).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
            rec = vae.decode(z).sample
            rec_loss = (rec - xb).abs().mean()
            loss = rec_loss + cfg.kl_weight * post.kl().mean()
            ae_opt.zero_grad(set_to_none=True)
            loss.backward()
            ae_opt.step()
            state["step"] = s + 1
            prog(s, float(rec_loss.detach()))
            if state["step"] % cfg.checkpoint_every == 0:
                save_checkpoint()
        vae.eval()
        state.update(phase="encode", step=0)
        save_checkpoint()

    vae.eval().requires_grad_(False)
    # phase 2: encode the train set once, set the latent scale
    if state["phase"] == "encode":
        with torch.no_grad():
            lat = torch.cat([vae.encode(xb).latent_dist.mode() for xb in x.split(500)])
            rec = torch.cat([vae.decode(zb).sample for zb in lat[:1000].split(500)])
        std = float(lat.std())
        recon_l1 = float((rec.clamp(-1, 1) - x[:1000]).abs().mean())
        state.update(phase="unet", step=0, scaling_factor=1.0 / std, latents=lat * (1.0 / std))
        state["history"].append({"phase": "encode", "latent_std": std, "recon_l1_first1000": recon_l1})
        log(f"[encode] {n} latents {tuple(lat.shape[1:])}, std {std:.4f} -> scaling_factor "
            f"{1.0 / std:.4f}; reconstruction L1 (first 1000, [-1,1]) {recon_l1:.4f}")
        save_checkpoint()

    # phase 3: the UNet on the cached latents
    if state["phase"] == "unet":
        from diffusers import DDPMScheduler

        noise_sched = DDPMScheduler(**{kk: v for kk, v in CIN_SCHEDULE.items()
                                       if kk not in ("set_alpha_to_one", "steps_offset")})
        lat = state["latents"]
        unet.train()
        prog = _Progress("unet", state["step"], cfg.unet_steps, log, log_every)
        end = cfg.unet_steps if cfg.stop_unet_at is None else cfg.stop_unet_at
        session = {"phase": "unet-session", "from": int(state["step"]), "threads": torch.get_num_threads(),
                   "load_start": _loadavg()}
        t_session = time.monotonic()
        while state["step"] < end:
            s = state["step"]
            for g_ in unet_opt.param_groups:
                g_["lr"] = cfg.unet_lr * _lr_factor(s, cfg.unet_steps, cfg.warmup_steps)
            idx = torch.randint(0, n, (cfg.unet_batch_size,), generator=gen)
            z0, lab = lat[idx], y[idx].clone()
            drop = torch.rand(lab.shape, generator=gen) < cfg.label_dropout
            lab[drop] = k
            noise = torch.randn(z0.shape, generator=gen)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (z0.shape[0],), generator=gen)
            zt = noise_sched.add_noise(z0, noise, t)
            pred = unet(zt, t, class_labels=lab).sample
            loss = F.mse_loss(pred, noise)
            unet_opt.zero_grad(set_to_none=True)
            loss.backward()
            unet_opt.step()
            _ema_update(ema, unet, cfg.ema_decay if s >= cfg.warmup_steps else 0.0)
            state["step"] = s + 1
            prog(s, float(loss.detach()))
            if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.unet_steps:
                save_checkpoint()
            if state["step"] % cfg.sample_every == 0 and state["step"] != cfg.unet_steps:
                grid(f"unet-step{state['step']:06d}")
        if state["step"] > session["from"]:
            session.update(to=int(state["step"]), seconds=round(time.monotonic() - t_session, 1),
                           load_end=_loadavg())
            state["history"].append(session)     # this run's UNet steps, wall time and load (timing record)
        if end < cfg.unet_steps:
            # early export: the checkpoint stays resumable (phase unet); the model records the stop
            stop = {"phase": "unet", "stopped_at": end, "of": cfg.unet_steps}
            if not state["history"] or state["history"][-1] != stop:
                state["history"].append(stop)
            save_checkpoint()                    # the history (timing, early export) survives a resume
            log(f"[unet] stopped at step {end} of {cfg.unet_steps} (stop_unet_at)")
        else:
            state.update(phase="done", step=0)
            save_checkpoint()

    grid("final")
    _write_model(cfg, out, vae, ema, k, spec, state, settings, overwrite=overwrite)
    atomic_write_json(work / "train_summary.json", {"settings": settings, "history": state["history"],
                                                    "model": str(out)})
    log(f"wrote {out}")
    return out


def _is_early_export(out: Path, settings: dict[str, Any]) -> bool:
    """Whether ``out`` holds a model this configuration wrote early (``stop_unet_at``), which a
    resumed run may replace without ``overwrite``."""
    import json

    try:
        manifest = json.loads((out / "splatdd_ld3m.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and manifest.get("stop_unet_at") is not None
            and manifest.get("train") == settings)


def _write_model(cfg: TrainLDMConfig, out: Path, vae, ema, k: int, spec, state: dict[str, Any],
                 settings: dict[str, Any], *, overwrite: bool) -> None:
    """Save the LDM directory atomically (temporary sibling directory, then rename)."""
    from diffusers import DDIMScheduler

    vae = copy.deepcopy(vae)
    vae.register_to_config(scaling_factor=float(state["scaling_factor"]))
    unet = copy.deepcopy(ema)
    emb_dim = unet.class_embedding.embedding_dim
    emb = ClassEmbedder(k + 1, emb_dim, num_classes=k, null_class=k)
    with torch.no_grad():
        emb.embedding.weight.copy_(unet.class_embedding.weight)
    parts = {"vae": vae, "unet": unet, "scheduler": DDIMScheduler(**CIN_SCHEDULE), "class_embedder": emb}
    manifest = {"source": "splatdd train-ldm (splatdd_ld3m.train)", "dataset": spec.name,
                "stop_unet_at": cfg.stop_unet_at,
                "num_classes": k, "image_size": cfg.image_size, "channels": spec.channels,
                "dataset_resolution": [spec.height, spec.width], "train": settings,
                "history": state["history"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=str(out.parent)))
    try:
        save_ldm(parts, tmp, manifest=manifest)
        if out.exists():
            if not overwrite and any(out.iterdir()) and not _is_early_export(out, settings):
                raise FileExistsError(f"out_dir {out} appeared during training")
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["TrainLDMConfig", "train_ldm", "sample_images", "save_grid", "make_autoencoder", "make_unet",
           "CLASS_NAMES"]
