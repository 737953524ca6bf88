"""GSDD: every distilled image is a small set of 2D Gaussians, rendered by :func:`splatdd.render`.

Packed layout per Gaussian (the renderer's): ``[u, v, l11, l21, l22, c_1 .. c_C, alpha]``, all in
normalised image units (``u, v`` in ``[-1, 1]``, ``L`` the Cholesky factor of the covariance in the
same units), so the same parameters render at any resolution. Colours live in the same normalised
space as the real images the algorithm sees (a Gaussian-free pixel renders as 0, the dataset mean).

What the paper (GSDD, sections 3.1-3.2, appendix A) fixes and this module follows:

* fp32 master parameters; every forward pass renders the parameters rounded to bf16 with a
  straight-through gradient ``x + (bf16(x) - x).detach()``; the file stores bf16 (``bf16=False``:
  the "w/o bf16" ablation, which then also *stores* fp32 and so gets half as many Gaussians at the
  same storage);
* opacity ``alpha`` per Gaussian (``opacity=False``: alpha is fixed to 1, not learned and not
  stored, so each Gaussian costs ``5 + C`` values and the budget buys proportionally more of them);
* anti-aliasing: the renderer's prefilter (``Sigma + I/12``) and s x s supersampling (``ssaa=2``);
* boundary handling: centres clipped to ``[-1 + eps, 1 - eps]`` after every step (Eq. 11) and the
  boundary loss ``-E_k[log(1 - x~^2) + log(1 - y~^2)]`` (Eq. 10) with weight 0.1;
* storage budget: ``P = floor(H*W*C*IPC*2 / (GPC*(6+C)))`` points per image;
* Adam with lr 1e-2 both for fitting real images (initialisation) and for distillation with DM,
  DC and TM (appendix A.4).

What the paper leaves open for SRe2L's ``recover`` regime (appendix B.4 and Tables 18-19 give only
GPC) and we chose from measurements (docs/gaussian.md, benchmarks/results/fmnist_sre2l.md):
Adam lr 1e-3 (the paper's section 4.1 value; appendix A.4 says 1e-2, the paper contradicts itself)
with SRe2L's recover betas (0.5, 0.9), as pixel and idc use. At 1e-2 the Gaussians do learn the
recover loss (the teacher's cross-entropy on crops falls as far as pixel's), but the recovered
images turn into thin saturated strokes that teach a soft-label student less than the fitted real
images they started from (FashionMNIST IPC 1, measured on a validation split of the training set:
the ``--validate`` table of benchmarks/results/fmnist_sre2l.md); the damage grows with the lr, and
at 1e-3 with those betas the set as a whole gains from recovery (:data:`REGIME_OPTIMIZERS`).

What the paper leaves open and we chose (see docs/gaussian.md):

* ``eps = 1e-3`` (the paper gives no value);
* the starting geometry of the fit (``init_geometry``): by default a greedy matching pursuit of
  each real image with isotropic Gaussians (centres on pixels, 7 scales around half the grid
  spacing, least-squares colours, alpha 1; :mod:`splatdd_gaussian.pursuit`), followed by 250
  full-batch Adam steps, which end at a lower MSE than 1,000 steps from the grid start (issue 15,
  benchmarks/results/speed.md); ``init_geometry="grid"``: centres on a jittered grid, covariances
  isotropic with a standard deviation of half the grid spacing, alpha 1, colours the image sampled
  at the centre divided by the grid's coverage, then 1,000 steps (the step count of the paper's
  Table 5 fitting benchmark; appendix A.3 gives only the loss, the optimiser and the lr);
* the solid-colour warm-up (appendix B.3) fits every Gaussian image to one constant image of value
  ``warmup_color`` (0.5 in normalised units) for ``warmup_steps`` steps.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F

from splatdd.budget import budget_bytes_per_class
from splatdd.plugin_api import (PLUGIN_API_VERSION, DatasetSpec, OptimizerSpec, Parameterization,
                                check_regime, draw_seed, regime_setting, reject_unknown_options)

__all__ = ["GaussianImages", "REGIME_OPTIMIZERS", "default_gpc", "points_for_budget",
           "gaussian_points", "gaussian_bytes", "boundary_loss", "bf16_round_ste"]

#: GPC the paper used with TM (appendix A, tables 7 and 9), keyed by (resolution, channels, ipc).
_PAPER_GPC = {(32, 3, 1): 30, (32, 3, 10): 160, (32, 3, 50): 250, (128, 3, 1): 64, (128, 3, 10): 640}

_OPTIONS = ("gpc", "points", "bf16", "opacity", "prefilter", "ssaa", "clip", "clip_eps",
            "boundary_loss", "boundary_weight", "init", "init_steps", "init_lr", "lr", "lr_cholesky",
            "init_geometry",
            "warmup_steps", "warmup_color")


#: Adam settings per optimisation regime (:data:`splatdd.plugin_api.REGIMES`): ``lr`` unless the
#: ``lr`` option overrides it, ``betas`` (None: torch's (0.9, 0.999)). DM, DC, TM: GSDD appendix
#: A.4. ``recover`` (SRe2L): lr 1e-3 (GSDD section 4.1) and SRe2L's betas (0.5, 0.9); see the
#: module docstring for why not 1e-2.
REGIME_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "distribution": {"lr": 1e-2, "betas": None},
    "gradient": {"lr": 1e-2, "betas": None},
    "trajectory": {"lr": 1e-2, "betas": None},
    "recover": {"lr": 1e-3, "betas": (0.5, 0.9)},
}


#: Starting geometries of ``init_from_real`` and their default ``init_steps``: ``"pursuit"``
#: (matching pursuit, :mod:`splatdd_gaussian.pursuit`; 250 steps reach a lower MSE than the grid
#: start's 1000 on FashionMNIST IPC 1, benchmarks/results/speed.md) or ``"grid"`` (the jittered
#: grid, colours sampled from the image; 1000 steps, the paper's Table 5 fitting benchmark's count).
INIT_GEOMETRIES = {"pursuit": 250, "grid": 1000}


def bf16_round_ste(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to bf16 (values exactly representable in bf16, dtype of ``x``), with the
    identity as gradient (straight-through estimator)."""
    return x + (x.to(torch.bfloat16).to(x.dtype) - x).detach()


def boundary_loss(centres: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Eq. 10 of the paper: ``-mean_k[log(1 - x~_k^2) + log(1 - y~_k^2)]`` over all Gaussians,
    with ``x~ = clip(x, -1 + eps, 1 - eps)`` (Eq. 11), ``centres`` of shape ``(..., 2)``."""
    c = centres.clamp(-1.0 + eps, 1.0 - eps)
    return -torch.log1p(-c * c).sum(-1).mean()


def default_gpc(spec: DatasetSpec, ipc: int) -> int:
    """The paper's GPC where it published one (TM, appendix A), else a heuristic aiming at about
    ``22 * sqrt(ipc) * sqrt(H*W/1024)`` Gaussians per image (22 is the paper's CIFAR IPC=1 value)."""
    if spec.height == spec.width and (spec.height, spec.channels, ipc) in _PAPER_GPC:
        return _PAPER_GPC[(spec.height, spec.channels, ipc)]
    target = 22.0 * math.sqrt(ipc) * math.sqrt(spec.height * spec.width / 1024.0)
    per_class = ipc * spec.channels * spec.height * spec.width * 4 / ((6 + spec.channels) * 2)
    return max(1, int(per_class // max(target, 1.0)))


BF16_BYTES = 2


def _positive(name: str, value: int) -> int:
    try:
        ok = not isinstance(value, bool) and int(value) == value and value >= 1
    except (TypeError, ValueError):        # e.g. "abc" from --param-opt gpc=abc
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def gaussian_points(ipc: int, gpc: int, channels: int, height: int, width: int) -> int:
    """Gaussians per image when a class's budget of ``ipc`` fp32 images is spread over ``gpc``
    Gaussian images of bf16 ``(6 + C)``-vectors: ``floor(H*W*C*ipc*2 / (gpc*(6+C)))`` (GSDD's
    formula, for any C).

    >>> gaussian_points(1, 30, 3, 32, 32), gaussian_points(10, 160, 3, 32, 32)
    (22, 42)
    """
    ipc, gpc = _positive("ipc", ipc), _positive("gpc", gpc)
    channels, height, width = (_positive("channels", channels), _positive("height", height),
                               _positive("width", width))
    return (height * width * channels * ipc * 2) // (gpc * (6 + channels))


def gaussian_bytes(num_gaussians: int, channels: int) -> int:
    """Storage of ``num_gaussians`` bf16 Gaussians with ``channels`` colour channels."""
    return int(num_gaussians) * (6 + int(channels)) * BF16_BYTES


def points_for_budget(spec: DatasetSpec, ipc: int, gpc: int, *, values_per_gaussian: int,
                      bytes_per_value: int) -> int:
    """Gaussians per image that fit a class budget of ``ipc`` fp32 images spread over ``gpc``
    Gaussian images: ``floor(ipc*C*H*W*4 / (gpc * values_per_gaussian * bytes_per_value))``.

    With ``6 + C`` bf16 values this is the paper's :func:`gaussian_points`."""
    budget = budget_bytes_per_class(spec, ipc)
    return budget // (_positive("gpc", gpc) * values_per_gaussian * bytes_per_value)


def _render(params: torch.Tensor, H: int, W: int, *, ssaa: int, prefilter: bool) -> torch.Tensor:
    import splatdd
    return splatdd.render(params, H, W, ssaa=ssaa, prefilter=prefilter)


class GaussianImages(Parameterization):
    """``gpc`` Gaussian images per class, ``points`` Gaussians each (GSDD).

    Build with :meth:`build` (the budget decides ``points``) or directly::

        g = GaussianImages(spec, gpc=10, points=20)
        images = g.decode()              # (num_classes * gpc, C, H, W), differentiable
    """

    name: ClassVar[str] = "gaussian"
    #: initial standard deviation of every Gaussian, in grid cells
    _INIT_STD_CELLS: ClassVar[float] = 0.5
    api_version: ClassVar[int] = PLUGIN_API_VERSION

    def __init__(self, spec: DatasetSpec, gpc: int, points: int, *, bf16: bool = True,
                 opacity: bool = True, prefilter: bool = True, ssaa: int = 2, clip: bool = True,
                 clip_eps: float = 1e-3, boundary_loss: bool = True, boundary_weight: float = 0.1,
                 init: str = "real", init_steps: int | None = None, init_lr: float = 1e-2,
                 lr: float | None = None, lr_cholesky: float | None = None,
                 warmup_steps: int = 300,
                 warmup_color: float = 0.5, init_geometry: str = "pursuit",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if int(gpc) < 1 or int(points) < 1:
            raise ValueError(f"gpc and points must be >= 1, got gpc={gpc}, points={points}")
        if ssaa not in (1, 2, 4):
            raise ValueError(f"ssaa must be 1, 2 or 4, got {ssaa}")
        if init not in ("real", "random", "warmup"):
            raise ValueError(f"init must be 'real', 'random' or 'warmup', got {init!r}")
        if init_geometry not in INIT_GEOMETRIES:
            raise ValueError(f"gaussian: init_geometry must be one of {', '.join(INIT_GEOMETRIES)}, "
                             f"got {init_geometry!r}")
        self.init_geometry = init_geometry
        if init_steps is None:
            init_steps = INIT_GEOMETRIES[init_geometry]
        if not 0.0 < clip_eps < 1.0:
            raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
        self.spec = spec
        self.gpc, self.points = int(gpc), int(points)
        self.bf16, self.opacity = bool(bf16), bool(opacity)
        self.prefilter, self.ssaa = bool(prefilter), int(ssaa)
        self.clip, self.clip_eps = bool(clip), float(clip_eps)
        self.use_boundary_loss, self.boundary_weight = bool(boundary_loss), float(boundary_weight)
        self.init_mode, self.init_steps, self.init_lr = init, int(init_steps), float(init_lr)
        #: None: each regime's lr from :data:`REGIME_OPTIMIZERS`; a number overrides every regime's
        self.lr = None if lr is None else float(lr)
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"gaussian: lr must be a positive number, got {lr!r}")
        self.lr_cholesky = None if lr_cholesky is None else float(lr_cholesky)
        if self.lr_cholesky is not None and not (self.lr_cholesky > 0
                                                 and math.isfinite(self.lr_cholesky)):
            raise ValueError(f"gaussian: lr_cholesky must be a positive number, got "
                             f"{lr_cholesky!r}")
        self.warmup_steps, self.warmup_color = int(warmup_steps), float(warmup_color)
        C = spec.channels
        n = spec.num_classes * self.gpc
        self.register_buffer("_labels", torch.arange(spec.num_classes).repeat_interleave(self.gpc))
        #: fp32 master parameters ``(n, P, 6 + C)`` in the renderer's packed layout.
        self.params = torch.nn.Parameter(torch.zeros(n, self.points, 6 + C))
        # all later randomness (init jitter) derives from this seed, drawn from `generator`
        self._seed = draw_seed(generator) if generator is not None else 0
        self._init_geometry(None, self._generator())

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self._seed)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, spec: DatasetSpec, ipc: int, *, generator: torch.Generator | None = None,
              **options: Any) -> "GaussianImages":
        reject_unknown_options("gaussian", options, _OPTIONS)
        gpc = options.pop("gpc", None)
        gpc = default_gpc(spec, ipc) if gpc is None else _positive("gpc", gpc)
        points = options.pop("points", None)
        if points is None:
            values = 6 + spec.channels - (0 if options.get("opacity", True) else 1)
            points = points_for_budget(spec, ipc, gpc, values_per_gaussian=values,
                                       bytes_per_value=2 if options.get("bf16", True) else 4)
            if points < 1:
                raise ValueError(f"gaussian: gpc={gpc} leaves less than one Gaussian per image "
                                 f"within the budget of ipc={ipc}; lower gpc")
        return cls(spec, gpc, _positive("points", points), generator=generator, **options)

    @classmethod
    def storage_options(cls, spec: DatasetSpec, items_per_class: int,
                        bytes_per_item: float) -> dict[str, Any]:
        """``gpc = items_per_class`` images of as many bf16 ``(6 + C)``-value Gaussians as
        ``bytes_per_item`` holds (``splatdd fit``'s equal-storage sizing)."""
        return {"gpc": int(items_per_class),
                "points": int(bytes_per_item // ((6 + spec.channels) * BF16_BYTES))}

    @property
    def num_images(self) -> int:
        return self.params.shape[0]

    @property
    def values_per_gaussian(self) -> int:
        """Stored values per Gaussian: ``6 + C``, or ``5 + C`` without opacity."""
        return 6 + self.spec.channels - (0 if self.opacity else 1)

    @property
    def bytes_per_value(self) -> int:
        return 2 if self.bf16 else 4

    @torch.no_grad()
    def _init_geometry(self, images: torch.Tensor | None, generator: torch.Generator | None,
                       *, jitter: float = 0.5) -> None:
        """Centres on a jittered grid, isotropic covariance (std = half the grid spacing), alpha 1;
        colours sampled from ``images`` at the centres (scaled by the grid's coverage), or random
        normal when ``images`` is None. With real ``images`` and ``init_geometry="pursuit"``,
        centres, scales (the grid's std x 2^(k/2), |k| <= 3) and colours come from a matching
        pursuit of each image instead (:func:`splatdd_gaussian.pursuit.pursuit`)."""
        n, P = self.num_images, self.points
        H, W, C = self.spec.height, self.spec.width, self.spec.channels
        dev = self.params.device
        gx = max(1, math.ceil(math.sqrt(P * W / H)))
        gy = max(1, math.ceil(P / gx))
        cells = torch.rand(n, gx * gy, generator=generator).argsort(dim=1)[:, :P]   # P distinct
        cy, cx = (cells // gx).float(), (cells % gx).float()
        jit = (torch.rand(n, P, 2, generator=generator) - 0.5) * jitter
        u = -1.0 + (cx + 0.5 + jit[..., 0]) * (2.0 / gx)
        v = -1.0 + (cy + 0.5 + jit[..., 1]) * (2.0 / gy)
        # isotropic in pixels: std = half a cell (W / gx pixels wide) -> l = std_px * 2 / size
        std_px = self._INIT_STD_CELLS * min(W / gx, H / gy)
        p = torch.zeros(n, P, 6 + C)
        p[..., 0], p[..., 1] = u, v
        p[..., 2] = 2.0 * std_px / W
        p[..., 4] = 2.0 * std_px / H
        p[..., 5 + C] = 1.0
        # sum_k g_k(x) ~ (P / cells) * 2 pi std^2 / cell_area: divide colours by that coverage
        coverage = (P / (gx * gy)) * 2.0 * math.pi * std_px ** 2 / ((W / gx) * (H / gy))
        if images is None:
            p[..., 5:5 + C] = torch.randn(n, P, C, generator=generator) / coverage
        elif self.init_geometry == "pursuit":
            from .pursuit import pursuit, pursuit_scales
            centres, sigma, weights = pursuit(images.detach().float().cpu(), P,
                                              pursuit_scales(std_px))
            p[..., 0] = -1.0 + (centres[..., 0] + 0.5) * (2.0 / W)
            p[..., 1] = -1.0 + (centres[..., 1] + 0.5) * (2.0 / H)
            p[..., 2], p[..., 3], p[..., 4] = 2.0 * sigma / W, 0.0, 2.0 * sigma / H
            p[..., 5:5 + C] = weights
        else:
            img = images.detach().float().cpu()
            grid = torch.stack([u, v], -1).unsqueeze(2)                     # (n, P, 1, 2)
            col = F.grid_sample(img, grid, mode="bilinear", align_corners=False)  # (n, C, P, 1)
            p[..., 5:5 + C] = col[..., 0].permute(0, 2, 1) / coverage
        if self.clip:
            p[..., :2].clamp_(-1.0 + self.clip_eps, 1.0 - self.clip_eps)
        self.params.copy_(p.to(dev))

    def init_from_real(self, images: torch.Tensor, labels: torch.Tensor, *,
                       steps: int | None = None, progress: bool = False) -> dict[str, float]:
        """Fit one Gaussian image to each real image (Eq. 8): MSE, Adam (lr ``init_lr`` = 1e-2),
        the whole distilled set in one renderer call per step, ``steps`` (default ``init_steps``).

        With ``init="warmup"`` the real images are ignored and every Gaussian image is fitted to
        one solid-colour image instead (appendix B.3); with ``init="random"`` nothing is fitted.
        """
        if self.init_mode == "random":
            return {"init": 0.0, "steps": 0.0}
        if self.init_mode == "warmup":
            return self.warmup(steps=steps, progress=progress)
        n = self.num_images
        if images.shape != (n, self.spec.channels, self.spec.height, self.spec.width):
            raise ValueError(f"gaussian.init_from_real: expected images of shape "
                             f"{(n, self.spec.channels, self.spec.height, self.spec.width)}, "
                             f"got {tuple(images.shape)}")
        if labels is not None and not torch.equal(labels.cpu().long(), self._labels.cpu()):
            raise ValueError("gaussian.init_from_real: labels must equal self.labels (one real "
                             "image of the right class per Gaussian image, in order)")
        self._init_geometry(images, self._generator())
        target = images.detach().to(self.params.device, torch.float32)
        return self.fit(target, steps=self.init_steps if steps is None else steps,
                        lr=self.init_lr, progress=progress)

    def warmup(self, *, steps: int | None = None, color: float | None = None,
               progress: bool = False) -> dict[str, float]:
        """Solid-colour warm-up (appendix B.3): fit every Gaussian image to one constant image."""
        C, H, W = self.spec.channels, self.spec.height, self.spec.width
        value = self.warmup_color if color is None else float(color)
        target = torch.full((1, C, H, W), value, device=self.params.device)
        out = self.fit(target.expand(self.num_images, C, H, W),
                       steps=self.warmup_steps if steps is None else steps, lr=self.init_lr,
                       progress=progress)
        out["init_warmup"] = 1.0
        return out

    def fit(self, target: torch.Tensor, *, steps: int, lr: float | None = None,
            progress: bool = False, history: list | None = None,
            history_every: int = 0, regularize: bool = False) -> dict[str, float]:
        """Minimise ``MSE(decode(), target)`` with Adam for ``steps`` full-batch steps, through the
        core's loop :func:`splatdd.fit.fit_images` (clipping after each step as in distillation;
        ``regularize`` adds :meth:`regularization`, the boundary loss). ``history`` (a list)
        collects centre snapshots ``(n, P, 2)`` every ``history_every`` steps (for
        :func:`plot_centres`)."""
        from splatdd.fit import fit_images

        def snapshot(it: int, loss: float) -> None:
            if history is not None and history_every and it % history_every == 0:
                history.append(self.params[..., :2].detach().cpu().clone())

        return fit_images(self, target, steps=steps, lr=self.init_lr if lr is None else lr,
                          regularize=regularize, on_step=snapshot, progress=progress)

    # ---- decoding -------------------------------------------------------------------------------
    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    def packed(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The parameters the renderer sees: alpha fixed to 1 without opacity, then rounded to
        bf16 (straight-through) when ``bf16``. Shape ``(len(indices), P, 6 + C)``, fp32."""
        x = self.params if indices is None else self.params[indices.to(self.params.device)]
        if not self.opacity:
            x = torch.cat([x[..., :-1], torch.ones_like(x[..., -1:])], dim=-1)
        if self.bf16:
            x = bf16_round_ste(x)
        return x

    def decode(self, indices: torch.Tensor | None = None, *,
               resolution: tuple[int, int] | None = None) -> torch.Tensor:
        H, W = self.spec.resolution if resolution is None else (int(resolution[0]),
                                                                  int(resolution[1]))
        x = self.packed(indices)
        if x.shape[0] == 0:
            return x.new_zeros(0, self.spec.channels, H, W)
        return _render(x.contiguous(), H, W, ssaa=self.ssaa, prefilter=self.prefilter)

    # ---- optimisation hooks ---------------------------------------------------------------------
    def optimizer_spec(self, regime: str, lr: float | None = None) -> OptimizerSpec:
        """Adam with the regime's setting from :data:`REGIME_OPTIMIZERS` (DM, DC, TM: lr 1e-2, GSDD
        appendix A.4; ``recover``: lr 1e-3, betas (0.5, 0.9)); the ``lr`` option, then the ``lr``
        argument, override its lr (not its betas). An unknown regime raises ``ValueError``. With
        ``lr_cholesky`` the Cholesky entries get that lr instead (the presets use it to match the
        reference code, whose Cholesky factor is in pixels: 1e-2 there is 1e-2 * 2 / W here)::

            GaussianImages.build(spec, 1).optimizer_spec("recover").build()  # Adam 1e-3 (0.5, 0.9)
        """
        check_regime(regime, what="gaussian: regime")
        setting = regime_setting(REGIME_OPTIMIZERS, regime, "gaussian")
        base = float(lr) if lr is not None else (self.lr if self.lr is not None
                                                 else float(setting["lr"]))
        group: dict[str, Any] = {"params": [self.params], "lr": base}
        if self.lr_cholesky is not None:
            # the Cholesky entries l11, l21, l22 step at lr_cholesky (per-element lr, exact for Adam)
            scale = torch.ones(self.params.shape[-1])
            scale[2:5] = self.lr_cholesky / base
            group["lr_scale"] = scale
        return OptimizerSpec(params=[group], kind="adam", betas=setting["betas"])

    def regularization(self) -> torch.Tensor | None:
        """``boundary_weight`` (0.1) times the boundary loss of Eq. 10 on the fp32 centres."""
        if not self.use_boundary_loss or self.boundary_weight == 0.0:
            return None
        return self.boundary_weight * boundary_loss(self.params[..., :2], self.clip_eps)

    @torch.no_grad()
    def post_step(self) -> None:
        """Eq. 11: clip the centres to ``[-1 + eps, 1 - eps]``."""
        if self.clip:
            self.params[..., :2].clamp_(-1.0 + self.clip_eps, 1.0 - self.clip_eps)

    # ---- storage --------------------------------------------------------------------------------
    def num_bytes(self) -> int:
        return self.num_images * self.points * self.values_per_gaussian * self.bytes_per_value

    def state_tensors(self) -> dict[str, torch.Tensor]:
        x = self.params.detach()[..., :self.values_per_gaussian]
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        return {"gaussians": x.to("cpu", dtype).contiguous()}

    def config(self) -> dict[str, Any]:
        return {"gpc": self.gpc, "points": self.points, "bf16": self.bf16,
                "opacity": self.opacity, "prefilter": self.prefilter, "ssaa": self.ssaa,
                "clip": self.clip, "clip_eps": self.clip_eps,
                "boundary_loss": self.use_boundary_loss, "boundary_weight": self.boundary_weight,
                "init": self.init_mode, "init_steps": self.init_steps, "init_lr": self.init_lr,
                "lr": self.lr, "lr_cholesky": self.lr_cholesky, "warmup_steps": self.warmup_steps,
                "warmup_color": self.warmup_color, "init_geometry": self.init_geometry}

    @classmethod
    def from_state(cls, spec: DatasetSpec, tensors: Mapping[str, torch.Tensor],
                   config: Mapping[str, Any]) -> "GaussianImages":
        for key in ("gpc", "points"):
            if key not in config:
                raise ValueError(f"gaussian.from_state: config is missing {key!r}")
        unknown = sorted(set(config) - set(_OPTIONS))
        if unknown:
            raise ValueError(f"gaussian.from_state: unknown config key(s) {', '.join(unknown)}")
        if "gaussians" not in tensors:
            raise ValueError("gaussian.from_state: tensor 'gaussians' is missing")
        obj = cls(spec, **dict(config))
        x = tensors["gaussians"]
        want = (obj.num_images, obj.points, obj.values_per_gaussian)
        if tuple(x.shape) != want:
            raise ValueError(f"gaussian.from_state: tensor 'gaussians' has shape {tuple(x.shape)}, "
                             f"expected {want} (num_classes*gpc, points, values per Gaussian)")
        want_dtype = torch.bfloat16 if obj.bf16 else torch.float32
        if x.dtype != want_dtype:
            raise ValueError(f"gaussian.from_state: tensor 'gaussians' has dtype {x.dtype}, "
                             f"expected {want_dtype}")
        with torch.no_grad():
            obj.params.zero_()
            obj.params[..., :obj.values_per_gaussian].copy_(x.float())
            if not obj.opacity:
                obj.params[..., -1] = 1.0
        return obj

    def extra_repr(self) -> str:
        return (f"images={self.num_images}, gpc={self.gpc}, points={self.points}, "
                f"bytes={self.num_bytes()}, bf16={self.bf16}, opacity={self.opacity}")
