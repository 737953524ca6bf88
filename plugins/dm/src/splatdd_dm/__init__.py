"""``dm``: Distribution Matching (Zhao & Bilen, "Dataset Condensation with Distribution Matching",
WACV 2023).

Every step draws a *fresh, randomly initialised* network (default ``ConvNet`` at the dataset's
resolution, its weights seeded from the algorithm's generator) and uses it as a frozen embedder (the
features before the linear head: ``net.embed(x)``). For every class ``c`` it samples a real batch
(``batch_real``, 256 by default), applies DSA with one shared seed to the real batch and to the
class's synthetic images (siamese augmentation), and adds
``|| mean(embed(real_c)) - mean(embed(syn_c)) ||^2`` to the loss. Gradients flow only into the
synthetic images (the real embeddings are computed without a graph).

Options: ``batch_real`` (256), ``dsa`` (True), ``dsa_strategy``
(:data:`splatdd.augment.DEFAULT_STRATEGY`), ``model`` (``"ConvNet"``), ``net_width`` (128),
``net_depth`` (None: by resolution), ``net_norm`` (``"instancenorm"``) -- the same ``net_*`` names as
dc -- and ``precision`` (``"fp32"``; ``"bf16"`` runs the graph-free real-batch embedding in
bfloat16 where the device has native bf16, :mod:`splatdd.precision`; the synthetic images' path,
and so their gradient, stays fp32). The paper runs 20,000 iterations. The regime is
``"distribution"``: the parameterization chooses its optimiser for it (pixels: SGD lr 1.0,
momentum 0.5, the paper's).

All randomness comes from ``self.generator``, which the core's loop saves in its checkpoints, so
a resumed run is bit-identical to an uninterrupted one: per step it draws the random network's seed
and a step seed; each class's real batch and DSA seed come from
:func:`splatdd.distributed.item_generator` (step seed, class), so a run on K processes (each
computing the classes :func:`splatdd.distributed.owned` gives it; gradients summed) draws exactly
what one process draws.

Speed (issue 15): on the CPU the real batches are augmented and embedded in chunks of
:data:`REAL_CHUNK` images (``REAL_CHUNK_BF16`` in bf16) and their embeddings summed, so no call
maps and unmaps ~100 MB activation buffers. DSA's seeded batch mode gives every chunk the same
transform, so this is the same mean as one pass, up to float rounding (tested: rtol 1e-5).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from splatdd import distributed
from splatdd.augment import DEFAULT_STRATEGY
from splatdd.precision import PRECISIONS, resolve_precision
from splatdd.plugin_api import (PLUGIN_API_VERSION, Algorithm, Parameterization, RealData,
                                draw_seed, reject_unknown_options)

__all__ = ["DistributionMatching", "REAL_CHUNK", "REAL_CHUNK_BF16"]
__version__ = "0.1.0"

#: Real images per graph-free embedding pass on the CPU, fp32 and bf16 (benchmarks/speed.py).
REAL_CHUNK = 16
REAL_CHUNK_BF16 = 16


class DistributionMatching(Algorithm):
    """Match the mean embedding of real and synthetic images per class under random networks."""

    name = "dm"
    api_version = PLUGIN_API_VERSION
    regime = "distribution"
    default_iterations = 20000
    #: Multi-process: each rank computes its classes' terms; the gradients are summed.
    gradient_reduction = "sum"

    OPTIONS: dict[str, Any] = {"batch_real": 256, "dsa": True, "dsa_strategy": DEFAULT_STRATEGY,
                               "model": "ConvNet", "net_width": 128, "net_depth": None,
                               "net_norm": "instancenorm", "precision": "fp32"}

    def __init__(self, real: RealData, *, ipc: int, generator: torch.Generator,
                 **options: Any) -> None:
        super().__init__(real, ipc=ipc, generator=generator)
        reject_unknown_options("dm", options, self.OPTIONS)
        opts = {**self.OPTIONS, **options}
        self.batch_real = int(opts["batch_real"])
        if self.batch_real < 1:
            raise ValueError(f"dm: batch_real must be >= 1, got {self.batch_real}")
        self.dsa = bool(opts["dsa"])
        self.dsa_strategy = str(opts["dsa_strategy"])
        self.model = str(opts["model"])
        self.net_width = int(opts["net_width"])
        if self.net_width < 1:
            raise ValueError(f"dm: net_width must be >= 1, got {self.net_width}")
        self.net_depth = None if opts["net_depth"] is None else int(opts["net_depth"])
        self.net_norm = str(opts["net_norm"])
        self.precision = str(opts["precision"])
        if self.precision not in PRECISIONS:
            raise ValueError(f"dm: precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {opts['precision']!r}")

    @classmethod
    def quick_options(cls, real: RealData, ipc: int, workdir: Any = None) -> dict[str, Any]:
        """A width-8 network (:func:`splatdd.testing.quick_depth` blocks), real batches of 8."""
        from splatdd.testing import quick_depth
        return {"net_width": 8, "net_depth": quick_depth(real.spec), "batch_real": 8}

    def config(self) -> dict[str, Any]:
        return {"batch_real": self.batch_real, "dsa": self.dsa, "dsa_strategy": self.dsa_strategy,
                "model": self.model, "net_width": self.net_width, "net_depth": self.net_depth,
                "net_norm": self.net_norm, "precision": self.precision}

    # ---- pieces (overridable in tests / subclasses) -------------------------------------------
    def draw_seed(self) -> int:
        """A seed from the algorithm's generator (:func:`splatdd.plugin_api.draw_seed`)."""
        return draw_seed(self.generator)

    def make_embedder(self, seed: int, device: torch.device) -> Callable[[torch.Tensor],
                                                                         torch.Tensor]:
        """A frozen, freshly initialised network's feature extractor, weights seeded by ``seed``."""
        from splatdd.models import get_network, set_first_order

        spec = self.real.spec
        net = get_network(self.model, spec.channels, spec.num_classes, (spec.height, spec.width),
                          width=self.net_width, depth=self.net_depth, norm=self.net_norm,
                          seed=seed)
        net = net.to(device)
        net.train()                      # as in DM's reference code (no-op for instance norm)
        net.requires_grad_(False)
        # dm's loss is differentiated once (into the synthetic images): ConvNets may run their
        # fused first-order blocks on the synthetic path too
        set_first_order(net, True)
        if hasattr(net, "embed"):
            return net.embed
        body = torch.nn.Sequential(*list(net.children())[:-1])
        return lambda x: body(x).flatten(1)

    def augment(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        if not self.dsa:
            return x
        from splatdd.augment import dsa
        return dsa(x, self.dsa_strategy, seed=seed)

    @torch.no_grad()
    def real_mean(self, embed: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                  seed: int, precision: str = "fp32") -> torch.Tensor:
        """Mean embedding (fp32, no graph) of the real batch ``real`` augmented with ``seed``.

        On the CPU in chunks (:data:`REAL_CHUNK`); with ``precision="bf16"`` the embedder runs
        in bfloat16 (a bf16 copy of the network when ``embed`` is a module's method, autocast
        otherwise) and the embeddings are summed in fp32.
        """
        n = real.shape[0]
        if real.device.type != "cpu":
            chunk = n
        else:
            chunk = REAL_CHUNK_BF16 if precision == "bf16" else REAL_CHUNK
        fn = _bf16_embedder(embed) if precision == "bf16" else embed
        dtype = (torch.bfloat16 if precision == "bf16" and _param_dtype(fn) == torch.bfloat16
                 else real.dtype)
        autocast = precision == "bf16" and dtype != torch.bfloat16
        total = None
        for i in range(0, n, chunk):
            x = self.augment(real[i:i + chunk], seed).to(dtype)
            with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=autocast):
                part = fn(x).float().sum(0)
            total = part if total is None else total + part
        return total / n

    # ---- the objective ------------------------------------------------------------------------
    def loss(self, param: Parameterization, step: int) -> torch.Tensor:
        syn = param.decode()
        labels = param.labels.to(syn.device)
        embed = self.make_embedder(self.draw_seed(), syn.device)
        step_seed = self.draw_seed()       # shared by every rank: one stream per class below
        precision = resolve_precision(self.precision, syn.device, who="dm")
        # the real batches' embedder: in bf16 one copy of the network per step, not per class
        embed_real = _bf16_embedder(embed) if precision == "bf16" else embed
        real_means, syn_parts, classes = [], [], []
        present = [c for c in range(self.real.spec.num_classes)
                   if bool((labels == c).any())]
        if not present:
            raise ValueError("dm: the parameterization has no images of any dataset class")
        for c in distributed.owned(present):     # all classes in one process
            idx = torch.nonzero(labels == c, as_tuple=False).flatten()
            g = distributed.item_generator(step_seed, c)
            real = self.real.sample(c, self.batch_real, g).to(syn.device)
            seed = draw_seed(g) if self.dsa else 0
            real_means.append(self.real_mean(embed_real, real, seed, precision))
            syn_parts.append(self.augment(syn[idx], seed))
            classes.append(idx.numel())
        if not syn_parts:                        # a rank with no class this step
            return syn.sum() * 0.0
        # one forward for all synthetic images (embedders are per-sample: instance norm, no BN)
        feats = embed(torch.cat(syn_parts)).split(classes)
        loss = syn.new_zeros(())
        for fr, fs in zip(real_means, feats):
            loss = loss + ((fr - fs.mean(0)) ** 2).sum()
        return loss


def _param_dtype(fn: Callable) -> torch.dtype | None:
    """The dtype of the parameters of the module whose method ``fn`` is (None otherwise)."""
    owner = getattr(fn, "__self__", None)
    if not isinstance(owner, torch.nn.Module):
        return None
    p = next(owner.parameters(), None)
    return None if p is None else p.dtype


def _bf16_embedder(embed: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """``embed`` on a bfloat16 copy of its module (``embed`` itself when it is not a module's
    method, which then runs under autocast, or when the module is bfloat16 already)."""
    dtype = _param_dtype(embed)
    if dtype is None or dtype == torch.bfloat16:
        return embed
    import copy
    return getattr(copy.deepcopy(embed.__self__).to(torch.bfloat16), embed.__name__)

