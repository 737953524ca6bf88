"""Storage accounting of GaussianImages is exact and within the budget."""
import pytest
import torch

from splatdd.budget import budget_bytes
from splatdd.plugin_api import REGIMES, DatasetSpec, check_plugin_class
from splatdd_gaussian import (GaussianImages, default_gpc, gaussian_bytes, gaussian_points,
                              points_for_budget)

CIFAR = DatasetSpec("cifar10", 3, 32, 32, 10)
FMNIST = DatasetSpec("fashion_mnist", 1, 28, 28, 10)


def test_plugin_class_is_valid():
    check_plugin_class(GaussianImages, "parameterization")
    assert GaussianImages.name == "gaussian"


@pytest.mark.parametrize("spec,ipc,gpc,points", [(CIFAR, 1, 30, 22), (CIFAR, 10, 160, 42),
                                                 (CIFAR, 50, 250, 136)])
def test_paper_points_formula(spec, ipc, gpc, points):
    # GSDD appendix A, table 7: CIFAR-10 IPC 1/10/50 -> GPC 30/160/250 with 22/42/136 points
    g = GaussianImages.build(spec, ipc, gpc=gpc)
    assert g.points == points == gaussian_points(ipc, gpc, 3, 32, 32)
    assert g.points == (32 * 32 * 3 * ipc * 2) // (gpc * 9)


@pytest.mark.parametrize("spec,ipc", [(CIFAR, 1), (CIFAR, 10), (FMNIST, 1), (FMNIST, 10),
                                      (DatasetSpec("in", 3, 128, 128, 10), 1)])
def test_bytes_exact_and_within_budget(spec, ipc):
    g = GaussianImages.build(spec, ipc)
    C = spec.channels
    n = spec.num_classes * g.gpc
    assert g.num_images == n == len(g.labels)
    assert g.num_bytes() == n * g.points * (6 + C) * 2
    st = g.state_tensors()
    assert set(st) == {"gaussians"}
    assert st["gaussians"].dtype == torch.bfloat16
    assert st["gaussians"].shape == (n, g.points, 6 + C)
    assert sum(t.numel() * t.element_size() for t in st.values()) == g.num_bytes()
    assert g.num_bytes() <= budget_bytes(spec, ipc)
    # one more point per image would break the budget (the formula takes the floor)
    assert n * (g.points + 1) * (6 + C) * 2 > budget_bytes(spec, ipc)


def test_default_gpc_uses_paper_table():
    assert default_gpc(CIFAR, 1) == 30 and default_gpc(CIFAR, 10) == 160
    assert default_gpc(DatasetSpec("in", 3, 128, 128, 10), 1) == 64
    assert GaussianImages.build(DatasetSpec("in", 3, 128, 128, 10), 1).points == 170


def test_without_opacity_alpha_is_not_stored():
    g = GaussianImages.build(CIFAR, 1, gpc=30, opacity=False)
    # alpha is not stored, so each Gaussian costs 5 + C values and the budget buys more of them
    assert g.points == (32 * 32 * 3 * 4) // (30 * 8 * 2) == 25
    assert g.num_bytes() == 300 * 25 * 8 * 2
    st = g.state_tensors()["gaussians"]
    assert st.shape == (300, 25, 8)
    assert st.numel() * st.element_size() == g.num_bytes() <= budget_bytes(CIFAR, 1)
    assert torch.all(g.packed()[..., -1] == 1.0)


def test_without_bf16_stores_fp32_and_halves_points():
    g = GaussianImages.build(CIFAR, 1, gpc=30, bf16=False)
    assert g.points == (32 * 32 * 3 * 4) // (30 * 9 * 4) == 11
    st = g.state_tensors()["gaussians"]
    assert st.dtype == torch.float32
    assert st.numel() * 4 == g.num_bytes() == 300 * 11 * 9 * 4 <= budget_bytes(CIFAR, 1)


def test_explicit_points_and_options():
    g = GaussianImages.build(FMNIST, 1, gpc=2, points=5)
    assert (g.gpc, g.points, g.num_images) == (2, 5, 20)
    assert g.params.shape == (20, 5, 7) and g.params.dtype == torch.float32
    assert torch.equal(g.labels, torch.arange(10).repeat_interleave(2))
    assert torch.equal(g.class_indices(3), torch.tensor([6, 7]))
    with pytest.raises(TypeError, match="bogus"):
        GaussianImages.build(FMNIST, 1, bogus=1)
    with pytest.raises(ValueError):
        GaussianImages.build(FMNIST, 1, gpc=10_000)


def test_points_for_budget_matches_core_formula():
    for ipc, gpc in [(1, 1), (1, 7), (10, 33), (50, 250)]:
        assert points_for_budget(FMNIST, ipc, gpc, values_per_gaussian=7, bytes_per_value=2) == \
            gaussian_points(ipc, gpc, 1, 28, 28) == (28 * 28 * ipc * 2) // (gpc * 7)


def test_optimizer_spec_per_regime():
    """GSDD appendix A.4: Adam lr 1e-2 for DM, DC, TM; recover (SRe2L): lr 1e-3 (GSDD section 4.1)
    with SRe2L's betas (0.5, 0.9); the lr option and argument override the lr, not the betas; an
    unknown regime is refused."""
    g = GaussianImages.build(FMNIST, 1, gpc=1, points=3)
    for regime in REGIMES:
        spec = g.optimizer_spec(regime)
        want = (1e-3, (0.5, 0.9)) if regime == "recover" else (1e-2, None)
        assert spec.kind == "adam" and (spec.params[0]["lr"], spec.betas) == want
        assert spec.params[0]["params"][0] is g.params
    assert g.optimizer_spec("gradient", lr=0.5).params[0]["lr"] == 0.5
    assert g.optimizer_spec("recover", lr=0.5).betas == (0.5, 0.9)
    pinned = GaussianImages.build(FMNIST, 1, gpc=1, points=3, lr=0.02)
    assert {pinned.optimizer_spec(r).params[0]["lr"] for r in REGIMES} == {0.02}
    assert pinned.config()["lr"] == 0.02 and g.config()["lr"] is None
    assert isinstance(g.optimizer_spec("distribution").build(), torch.optim.Adam)
    with pytest.raises(ValueError, match="regime must be one of distribution.*got 'dm'"):
        g.optimizer_spec("dm")
    with pytest.raises(ValueError, match="gaussian: lr must be a positive number"):
        GaussianImages.build(FMNIST, 1, gpc=1, points=3, lr=0.0)


def test_recover_steps_match_hand_written_adam():
    """Oracle: Adam with betas (0.5, 0.9) written out by hand (bias-corrected moments). The first
    step moves every entry with a non-zero gradient by lr = 1e-3 (Cholesky: lr_cholesky) up to eps,
    i.e. 1/70 of a pixel for a centre at 28 px; later steps follow the hand recursion, which
    torch's default betas (0.9, 0.999) would not."""
    from splatdd.testing import TINY_SPEC
    g = GaussianImages.build(TINY_SPEC, 1, generator=torch.Generator().manual_seed(0),
                             bf16=False, lr_cholesky=5e-4)
    opt = g.optimizer_spec("recover").build()
    x = g.params.detach().double().clone()
    lr = torch.full_like(x, 1e-3)
    lr[..., 2:5] = 5e-4
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    xd, md, vd = x.clone(), torch.zeros_like(x), torch.zeros_like(x)    # torch's default betas
    gens = torch.Generator().manual_seed(3)
    for t in range(1, 5):
        w = torch.randn(g.params.shape, generator=gens)
        opt.zero_grad()
        (g.params * w).sin().sum().backward()
        grad = g.params.grad.detach().double()
        before = g.params.detach().double().clone()
        opt.step()
        m = 0.5 * m + 0.5 * grad
        v = 0.9 * v + 0.1 * grad * grad
        step = lr * (m / (1 - 0.5 ** t)) / ((v / (1 - 0.9 ** t)).sqrt() + 1e-8)
        x = x - step
        md, vd = 0.9 * md + 0.1 * grad, 0.999 * vd + 0.001 * grad * grad
        xd = xd - lr * (md / (1 - 0.9 ** t)) / ((vd / (1 - 0.999 ** t)).sqrt() + 1e-8)
        assert torch.allclose(g.params.detach().double(), x, atol=1e-6)
        if t == 1:
            moved = (g.params.detach().double() - before).abs()
            assert torch.allclose(moved, lr, rtol=1e-3)
    # the oracle tells the betas apart: torch's default ones end elsewhere
    assert (g.params.detach().double() - xd).abs().max() > 1e-4


def test_lr_cholesky_steps_the_cholesky_entries_at_their_own_lr():
    """Oracle: Adam on two separate tensors (centres/colour/alpha at lr, Cholesky at lr_cholesky)."""
    from splatdd.testing import TINY_SPEC
    from splatdd_gaussian import GaussianImages
    g = GaussianImages.build(TINY_SPEC, 1, generator=torch.Generator().manual_seed(0),
                             lr=1e-2, lr_cholesky=1e-4, bf16=False)
    x0 = g.params.detach().clone()
    rest = torch.nn.Parameter(torch.cat([x0[..., :2], x0[..., 5:]], -1))
    chol = torch.nn.Parameter(x0[..., 2:5].clone())
    ref = torch.optim.Adam([{"params": [rest], "lr": 1e-2}, {"params": [chol], "lr": 1e-4}])
    opt = g.optimizer_spec("distribution").build()
    w = torch.randn(g.params.shape, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        (g.params * w).sin().sum().backward()
        opt.step()
        joined = torch.cat([rest[..., :2], chol, rest[..., 2:]], -1)
        ref.zero_grad()
        (joined * w).sin().sum().backward()
        ref.step()
    joined = torch.cat([rest[..., :2], chol, rest[..., 2:]], -1).detach()
    assert torch.allclose(g.params.detach(), joined, atol=1e-6)
    moved = (g.params.detach() - x0).abs()
    assert moved[..., 2:5].max() < 5e-4 < moved[..., :2].max()      # it really is slower
    with pytest.raises(ValueError, match="lr_cholesky must be a positive number"):
        GaussianImages.build(TINY_SPEC, 1, lr_cholesky=-1.0)
