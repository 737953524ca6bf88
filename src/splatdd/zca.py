"""ZCA whitening, the way the dataset-distillation code bases do it (KIP / MTT / FRePo / GSDD use
``kornia.enhance.ZCAWhitening(eps=0.1)``), in plain torch.

Fit on the flattened training images ``X`` (N x D): ``mu = mean(X)``, covariance
``S = (X - mu)^T (X - mu) / (N - 1)`` in float64, eigendecomposition ``S = U diag(s) U^T`` and

    W     = U diag(1 / sqrt(s + eps)) U^T        (whitening, applied as ``(x - mu) @ W``)
    W_inv = U diag(sqrt(s + eps)) U^T            (``inverse_transform``: ``y @ W_inv + mu``)

with ``eps = regularization`` (0.1 by default). The whitened training covariance is then exactly
``U diag(s / (s + eps)) U^T``: identity on high-variance directions, shrunk on noisy ones.
"""
from __future__ import annotations

import torch

__all__ = ["ZCA"]

#: Largest feature dimension (C*H*W) fitted by default: a D x D float64 eigendecomposition.
MAX_FEATURES = 16384


class ZCA:
    """``ZCA(regularization=0.1).fit(train)``; then ``transform`` / ``inverse_transform`` any
    ``(N, C, H, W)`` (or ``(N, D)``) tensor with the same per-sample shape."""

    def __init__(self, regularization: float = 0.1, *, max_features: int = MAX_FEATURES) -> None:
        if regularization < 0:
            raise ValueError("regularization must be >= 0")
        self.regularization = float(regularization)
        self.max_features = int(max_features)
        self.mean: torch.Tensor | None = None          # (D,) float64
        self.eigvals: torch.Tensor | None = None       # (D,) float64, ascending
        self.eigvecs: torch.Tensor | None = None       # (D, D) float64
        self.matrix: torch.Tensor | None = None        # W, (D, D) float32
        self.inverse_matrix: torch.Tensor | None = None
        self._shape: tuple[int, ...] | None = None

    # --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, x: torch.Tensor, *, chunk: int = 4096) -> "ZCA":
        n = x.shape[0]
        if n < 2:
            raise ValueError("ZCA needs at least 2 samples to fit")
        d = x[0].numel()
        if d > self.max_features:
            raise ValueError(f"ZCA on {d} features needs a {d}x{d} eigendecomposition; refusing "
                             f"above max_features={self.max_features} (raise it if you mean it)")
        flat = x.reshape(n, d)
        mean = flat.sum(0, dtype=torch.float64) / n
        cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        for i in range(0, n, chunk):
            xc = flat[i:i + chunk].to(torch.float64) - mean
            cov.addmm_(xc.T, xc)
        cov /= n - 1
        s, u = torch.linalg.eigh(cov)
        s = s.clamp_min(0.0)
        eps = self.regularization
        if eps == 0 and bool((s <= 0).any()):
            raise ValueError("covariance is singular; use regularization > 0")
        self.mean, self.eigvals, self.eigvecs = mean, s, u
        self.matrix = ((u * torch.rsqrt(s + eps)) @ u.T).to(torch.float32)
        self.inverse_matrix = ((u * torch.sqrt(s + eps)) @ u.T).to(torch.float32)
        self._shape = tuple(x.shape[1:])
        return self

    def _check(self, x: torch.Tensor) -> None:
        if self.matrix is None:
            raise RuntimeError("ZCA.fit() must be called first")
        if x[0].numel() != self.matrix.shape[0]:
            raise ValueError(f"ZCA was fitted on {self.matrix.shape[0]} features, got "
                             f"{x[0].numel()} ({tuple(x.shape[1:])})")

    def _apply(self, x, mat, pre, post, chunk: int):
        self._check(x)
        n = x.shape[0]
        flat = x.reshape(n, -1)
        mat = mat.to(device=x.device)
        mean = self.mean.to(device=x.device, dtype=torch.float32)
        if torch.is_grad_enabled() and x.requires_grad:     # differentiable path
            y = ((flat - mean) @ mat) if pre else (flat @ mat + mean)
            return y.to(x.dtype).reshape(x.shape)
        out = torch.empty_like(flat, dtype=torch.float32)
        for i in range(0, n, chunk):
            xb = flat[i:i + chunk].to(torch.float32)
            out[i:i + chunk] = ((xb - mean) @ mat) if pre else (xb @ mat + mean)
        return out.to(x.dtype).reshape(x.shape)

    def transform(self, x: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
        """Whiten: ``(x - mean) @ W``, same shape as ``x`` (differentiable)."""
        return self._apply(x, self.matrix, True, False, chunk)

    __call__ = transform

    def inverse_transform(self, y: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
        """Un-whiten: ``y @ W_inv + mean`` (differentiable)."""
        return self._apply(y, self.inverse_matrix, False, True, chunk)

    # --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.matrix is None:
            raise RuntimeError("ZCA.fit() must be called first")
        return {"mean": self.mean, "eigvals": self.eigvals, "eigvecs": self.eigvecs,
                "regularization": torch.tensor(self.regularization, dtype=torch.float64)}

    @classmethod
    def from_state_dict(cls, state) -> "ZCA":
        z = cls(float(state["regularization"]))
        z.mean, s, u = state["mean"].double(), state["eigvals"].double(), state["eigvecs"].double()
        z.eigvals, z.eigvecs = s, u
        eps = z.regularization
        z.matrix = ((u * torch.rsqrt(s + eps)) @ u.T).to(torch.float32)
        z.inverse_matrix = ((u * torch.sqrt(s + eps)) @ u.T).to(torch.float32)
        return z
