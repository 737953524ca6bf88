"""LD3M's reverse process: DDIM with a linearly decaying residual from z_T (paper Eq. 7, Algorithm 1).

Notation. ``T`` is the number of DDIM steps (not the 1000 training timesteps). Step ``k = 0 .. T-1``
of the loop has paper index ``t = T - k`` (``t = T .. 1``) and runs the denoiser at the training
timestep ``tau_k`` given by the scheduler (e.g. 901, 801, .., 1 for T = 10 with CompVis' "uniform"
spacing). With ``a = alphas_cumprod[tau_k]`` and ``a' = alphas_cumprod[tau_k - 1000 // T]`` (or the
scheduler's final value past 0), the plain DDIM step is

    x0   = (z_t - sqrt(1 - a) eps) / sqrt(a)                        (eps-prediction)
    mu   = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps
    z_t-1 = mu + sigma noise,     sigma = eta sqrt((1 - a') / (1 - a) (1 - a / a'))

and LD3M's modified step (Eq. 7) replaces the mean by a weighted average with the initial state:

    z_t-1 = (1 - t/T) mu + (t/T) z_T + sigma noise.

The paper (Eq. 5, Eq. 7, Algorithm 1) writes a stochastic sampler whose noise term is
``sigma_t^2 eps_t`` with a fresh ``eps_t ~ N(0, I)`` per step and ``z_T`` fixed within one pass;
``eta > 0`` gives it. The coefficient is DDIM's ``sigma_t`` by default (``noise_term="sigma"``: the
standard deviation of the step, which is what the variance-preserving process needs) and the
paper's literal ``sigma_t^2`` with ``noise_term="sigma_squared"``. The authors' released code calls
the CompVis DDIM sampler with ``eta=0.0`` (``src/glad_utils.py`` of Brian-Moser/prune_and_distill), so
it runs the deterministic sampler, where both forms vanish. At ``t = T`` the weight of z_T is 1, so the first step's mean is
exactly ``z_T`` and its denoiser call cannot influence anything: it is skipped (T - 1 denoiser calls).

``residual="x0"`` is the variant of the authors' released code (``p_sample_ddim`` in
Brian-Moser/prune_and_distill): the residual is mixed into the predicted x0 instead of the mean,
``x0 <- (1 - i/(T-1)) x0 + i/(T-1) q(Z)`` with ``i = T-1-k`` and ``q(Z)`` the VQ-quantised *clean*
latent, not the noised z_T. It is offered for comparison; the default is the paper's Eq. 7.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

RESIDUAL_MODES = ("eq7", "x0", "none")
NOISE_TERMS = ("sigma", "sigma_squared")
CHECKPOINT_MODES = ("nonreentrant", "reentrant", "off")


def normalize_checkpointing(value: bool | str | None) -> str:
    """``True`` -> ``"nonreentrant"``, ``False``/``None`` -> ``"off"``; strings are checked."""
    if value is True:
        return "nonreentrant"
    if value is False or value is None:
        return "off"
    v = str(value).lower().replace("-", "").replace("_", "")
    if v in ("true", "on", "yes", "1", "nonreentrant"):
        return "nonreentrant"
    if v in ("false", "off", "no", "0", "none"):
        return "off"
    if v == "reentrant":
        return "reentrant"
    raise ValueError(f"checkpointing must be True/False or one of {CHECKPOINT_MODES}, got {value!r}")


def run_checkpointed(fn, *args, mode: str = "nonreentrant"):
    """``fn(*args)``, under ``torch.utils.checkpoint`` unless ``mode == "off"`` or grad is disabled."""
    if mode == "off" or not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=(mode == "reentrant"))


def normalize_residual(residual: bool | str | None) -> str:
    """``True`` -> ``"eq7"``, ``False``/``None`` -> ``"none"``; strings are checked."""
    if residual is True:
        return "eq7"
    if residual is False or residual is None:
        return "none"
    if isinstance(residual, str) and residual.lower() in RESIDUAL_MODES:
        return residual.lower()
    if isinstance(residual, str) and residual.lower() in ("true", "on", "yes", "1"):
        return "eq7"
    if isinstance(residual, str) and residual.lower() in ("false", "off", "no", "0"):
        return "none"
    raise ValueError(f"residual must be True/False or one of {RESIDUAL_MODES}, got {residual!r}")


def normalize_noise_term(value: str) -> str:
    """``"sigma"`` (DDIM: ``sigma_t eps_t``) or ``"sigma_squared"`` (the paper's literal ``sigma_t^2 eps_t``)."""
    v = str(value).lower()
    if v not in NOISE_TERMS:
        raise ValueError(f"noise_term must be one of {NOISE_TERMS}, got {value!r}")
    return v


def noise_coefficient(sigma: float, noise_term: str = "sigma") -> float:
    """The factor of the per-step noise: ``sigma`` or ``sigma ** 2``."""
    return sigma * sigma if noise_term == "sigma_squared" else sigma


@dataclass(frozen=True)
class DDIMStep:
    """One step of the reverse loop (see module doc for the symbols)."""

    k: int              # loop index 0 .. T-1
    t: int              # paper index T .. 1
    timestep: int       # training timestep given to the denoiser
    alpha: float        # alphas_cumprod[timestep]
    alpha_prev: float   # alphas_cumprod[timestep - num_train // T] (or the final value)
    sigma: float        # DDIM noise scale for ``eta``


def ddim_schedule(scheduler, steps: int, *, eta: float = 0.0) -> list[DDIMStep]:
    """The DDIM steps of a diffusers ``DDIMScheduler`` for ``steps`` inference steps, in loop order.

    Uses the scheduler's own timestep spacing and its ``prev = t - num_train_timesteps // steps`` rule,
    so that a plain step here equals ``DDIMScheduler.step``."""
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n_train = int(scheduler.config.num_train_timesteps)
    if steps > n_train:
        raise ValueError(f"steps={steps} exceeds the model's {n_train} training timesteps")
    scheduler.set_timesteps(int(steps))
    ac = scheduler.alphas_cumprod.to(torch.float64)
    final = float(scheduler.final_alpha_cumprod)
    T = int(steps)
    out = []
    for k, ts in enumerate(scheduler.timesteps.tolist()):
        ts = int(ts)
        prev = ts - n_train // T
        a = float(ac[ts])
        ap = float(ac[prev]) if prev >= 0 else final
        var = (1.0 - ap) / (1.0 - a) * (1.0 - a / ap)
        sigma = float(eta) * math.sqrt(max(var, 0.0))
        out.append(DDIMStep(k=k, t=T - k, timestep=ts, alpha=a, alpha_prev=ap, sigma=sigma))
    return out


def split_model_output(model_out: torch.Tensor, z_t: torch.Tensor, alpha: float,
                       prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted x0, predicted eps) from the denoiser's output, for the three parameterisations."""
    sa, s1a = math.sqrt(alpha), math.sqrt(1.0 - alpha)
    if prediction_type == "epsilon":
        eps = model_out
        x0 = (z_t - s1a * eps) / sa
    elif prediction_type == "sample":
        x0 = model_out
        eps = (z_t - sa * x0) / s1a
    elif prediction_type == "v_prediction":
        x0 = sa * z_t - s1a * model_out
        eps = sa * model_out + s1a * z_t
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x0, eps


def residual_weight(step: DDIMStep, steps: int, residual: str) -> float:
    """Weight of the residual at this step: ``t/T`` for Eq. 7, ``i/(T-1)`` for the x0 variant, 0 off."""
    if residual == "eq7":
        return step.t / steps
    if residual == "x0":
        return (steps - 1 - step.k) / (steps - 1) if steps > 1 else 0.0
    return 0.0


def ld3m_step(z_t: torch.Tensor, model_out: torch.Tensor, z_T: torch.Tensor, step: DDIMStep,
              steps: int, *, residual: str = "eq7", prediction_type: str = "epsilon",
              noise: torch.Tensor | None = None, z_ref: torch.Tensor | None = None,
              clip_sample: float | None = None, noise_term: str = "sigma") -> torch.Tensor:
    """One reverse step z_t -> z_{t-1}: Eq. 7 (``residual="eq7"``), the released code's x0 variant
    (``"x0"``, residual ``z_ref``), or the plain DDIM step (``"none"``).

    ``noise`` is the standard-normal draw for ``sigma > 0`` (ignored when ``sigma == 0``), added
    with the factor ``sigma`` (``noise_term="sigma"``) or ``sigma ** 2`` (``"sigma_squared"``)."""
    x0, eps = split_model_output(model_out, z_t, step.alpha, prediction_type)
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    w = residual_weight(step, steps, residual)
    if residual == "x0":
        if z_ref is None:
            raise ValueError("residual='x0' needs z_ref (the quantised clean latent)")
        x0 = (1.0 - w) * x0 + w * z_ref
    mean = math.sqrt(step.alpha_prev) * x0 + math.sqrt(max(1.0 - step.alpha_prev - step.sigma ** 2, 0.0)) * eps
    if residual == "eq7":
        mean = (1.0 - w) * mean + w * z_T
    if step.sigma > 0:
        if noise is None:
            raise ValueError("eta > 0 needs a noise tensor for every step")
        mean = mean + noise_coefficient(step.sigma, noise_term) * noise
    return mean


def guided_output(ldm, z: torch.Tensor, cond: torch.Tensor, timestep: int, guidance: float,
                  null: torch.Tensor | None) -> torch.Tensor:
    """Classifier-free guidance: ``out_u + s (out_c - out_u)`` with the null class as unconditional
    input (one batched call); the plain conditional output when ``s == 1`` or there is no null class."""
    if null is None or guidance == 1.0:
        return ldm.model_output(z, timestep, cond)
    b = z.shape[0]
    uncond = null.to(cond.dtype).expand(b, -1)
    out = ldm.model_output(torch.cat([z, z]), timestep, torch.cat([uncond, cond]))
    out_u, out_c = out[:b], out[b:]
    return out_u + guidance * (out_c - out_u)


def reverse_process(ldm, z_T: torch.Tensor, cond: torch.Tensor, schedule: list[DDIMStep], *,
                    guidance: float = 3.0, residual: str = "eq7", prediction_type: str = "epsilon",
                    step_noise: Callable[[int], torch.Tensor] | None = None,
                    z_ref: torch.Tensor | None = None, clip_sample: float | None = None,
                    checkpointing: bool | str = "nonreentrant", noise_term: str = "sigma") -> torch.Tensor:
    """Run the T reverse steps from ``z_T`` with class embeddings ``cond`` and return z_0.

    With ``checkpointing`` (and grad enabled) each denoiser call is wrapped in
    ``torch.utils.checkpoint``: only the step inputs are kept and the UNet's activations are
    recomputed in backward. ``"nonreentrant"`` (``True``) is the recommended variant (works with
    ``torch.autograd.grad`` and double backward) but keeps about 1/8 of each call's activations
    until the whole backward ends (measured: ~0.8 MB per step vs ~7.7 MB uncheckpointed for 4 tiny
    images); ``"reentrant"`` frees each segment's recomputed graph at once (flat memory in T) but
    supports only ``.backward()``."""
    mode = normalize_checkpointing(checkpointing)
    steps = len(schedule)
    null = ldm.null_embedding()
    if guidance != 1.0 and null is None:
        raise ValueError("classifier-free guidance needs a null class embedding; this model has none "
                         "(set guidance=1)")
    z = z_T
    for st in schedule:
        w = residual_weight(st, steps, residual)
        noise = step_noise(st.k) if (st.sigma > 0 and step_noise is not None) else None
        if residual == "eq7" and w == 1.0:
            # Eq. 7 at t = T: the mean is z_T itself; the denoiser's output has weight 0.
            z = z_T if noise is None else z_T + noise_coefficient(st.sigma, noise_term) * noise
            continue
        out = run_checkpointed(guided_output, ldm, z, cond, st.timestep, guidance, null, mode=mode)
        z = ld3m_step(z, out, z_T, st, steps, residual=residual, prediction_type=prediction_type,
                      noise=noise, z_ref=z_ref, clip_sample=clip_sample, noise_term=noise_term)
    return z
