"""The paper's sampler options (eta / noise term, T from the resolution) and ablations (w/o diffusion,
c only, noise initialisation of c, budget override) on the tiny random LDM."""
from __future__ import annotations

import math

import pytest
import torch

from splatdd.budget import BudgetError, check_budget
from splatdd.plugin_api import DatasetSpec
from splatdd_ld3m import LatentDiffusionImages
from splatdd_ld3m.sampling import DDIMStep, ld3m_step


def _build(spec, tiny_dir, ipc=1, seed=0, **kw):
    kw.setdefault("steps", 3)
    return LatentDiffusionImages.build(spec, ipc, generator=torch.Generator().manual_seed(seed),
                                       model_path=str(tiny_dir), **kw)


def _loss(x: torch.Tensor) -> torch.Tensor:
    return (x * torch.linspace(-1, 1, x.numel()).view_as(x)).sum()


# ---- the stochastic sampler -----------------------------------------------------------------------
@pytest.mark.parametrize("noise_term", ["sigma", "sigma_squared"])
def test_eta_zero_equals_the_deterministic_ddim_loop(spec_two, tiny_dir, noise_term):
    """eta = 0 (either noise term) is the deterministic sampler: with the residual off it equals a
    loop of diffusers' DDIMScheduler.step from the same z_T, and Eq. 7 gives the same images as the
    default options."""
    from diffusers import DDIMScheduler

    p = _build(spec_two, tiny_dir, residual=False, eta=0.0, noise_term=noise_term, noise="fixed",
               guidance=1.0, clamp=False)
    idx = torch.arange(2)
    with torch.no_grad():
        z0 = p.latents_to_z0(idx)
        eps, _ = p._noises(idx)
        a_T = p._schedule[0].alpha
        z = math.sqrt(a_T) * p.latents + math.sqrt(1 - a_T) * eps
        sched = DDIMScheduler.from_config(p.ldm.scheduler_config)
        sched.set_timesteps(3)
        for t in sched.timesteps:
            out = p.ldm.model_output(z, int(t), p.class_embeddings)
            z = sched.step(out, t, z, eta=0.0).prev_sample
    torch.testing.assert_close(z0, z, rtol=1e-5, atol=1e-5)

    a = _build(spec_two, tiny_dir, noise="fixed")                      # defaults: eta 0, "sigma"
    b = _build(spec_two, tiny_dir, noise="fixed", eta=0.0, noise_term=noise_term)
    with torch.no_grad():
        assert torch.equal(a.decode(), b.decode())


def test_noise_term_scales_the_step_noise_by_sigma_or_sigma_squared():
    """Hand computation: the step's noise enters as sigma * n (DDIM) or sigma^2 * n (the paper's text)."""
    g = torch.Generator().manual_seed(1)
    z_t, out, z_T, n = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(4))
    st = DDIMStep(k=1, t=2, timestep=500, alpha=0.4, alpha_prev=0.6, sigma=0.3)
    base = ld3m_step(z_t, out, z_T, DDIMStep(1, 2, 500, 0.4, 0.6, 0.0), 3)
    # the mean with sigma > 0 uses sqrt(1 - a' - sigma^2) for the eps direction
    x0 = (z_t - math.sqrt(0.6) * out) / math.sqrt(0.4)
    mean = math.sqrt(0.6) * x0 + math.sqrt(1 - 0.6 - 0.09) * out
    mean = (1 - 2 / 3) * mean + (2 / 3) * z_T
    torch.testing.assert_close(ld3m_step(z_t, out, z_T, st, 3, noise=n), mean + 0.3 * n)
    torch.testing.assert_close(ld3m_step(z_t, out, z_T, st, 3, noise=n, noise_term="sigma_squared"),
                               mean + 0.09 * n)
    assert not torch.allclose(base, mean)      # sigma changes the mean too (DDIM), a real check


def test_bad_noise_term_is_refused(spec_two, tiny_dir):
    with pytest.raises(ValueError, match="noise_term"):
        _build(spec_two, tiny_dir, noise_term="sigma3")


def test_eta_positive_fixed_noise_passes_are_identical(spec_two, tiny_dir):
    """eta > 0 with noise='fixed': two decode passes draw the same z_T and step noises -> identical
    images; the noise really enters (differs from eta = 0)."""
    p = _build(spec_two, tiny_dir, eta=0.7, noise="fixed")
    q = _build(spec_two, tiny_dir, eta=0.0, noise="fixed")
    with torch.no_grad():
        x1, x2 = p.decode(), p.decode()
        x0 = q.decode()
    assert torch.equal(x1, x2)
    assert (x1 - x0).abs().max() > 1e-3


def test_eta_positive_per_pass_noise_is_fixed_within_a_pass(spec_two, tiny_dir):
    """noise='per_pass' (the paper): a new draw per decode call, and the same draw for the same
    pass counter (so a pass is a deterministic function of (Z, c, counter))."""
    p = _build(spec_two, tiny_dir, eta=0.7)
    with torch.no_grad():
        x1 = p.decode()
        x2 = p.decode()
        p.noise_pass.fill_(0)
        x1_again = p.decode()
    assert not torch.allclose(x1, x2)
    assert torch.equal(x1, x1_again)


def test_default_steps_follow_the_resolution(tiny_dir):
    """Appendix C: T = 10 at <= 128 px, 20 at 256 px; an explicit steps= wins."""
    def spec(r):
        return DatasetSpec("x", 3, r, r, 10, (0.5,) * 3, (0.5,) * 3)

    assert LatentDiffusionImages.build(spec(32), 1, model_path=str(tiny_dir)).steps == 10
    assert LatentDiffusionImages.build(spec(128), 1, model_path=str(tiny_dir)).steps == 10
    assert LatentDiffusionImages.build(spec(256), 1, model_path=str(tiny_dir)).steps == 20
    p = LatentDiffusionImages.build(spec(256), 1, model_path=str(tiny_dir), steps=4)
    assert p.steps == 4 and len(p._schedule) == 4 and p.config()["steps"] == 4


# ---- ablations ------------------------------------------------------------------------------------
def test_without_diffusion_decodes_z_directly(spec_two, tiny_dir, monkeypatch):
    """Table 6 'w/o diffusion': x = D(Z) (no noise, no UNet), c neither used nor stored."""
    p = _build(spec_two, tiny_dir, diffusion=False)
    ref = _build(spec_two, tiny_dir)
    with torch.no_grad():
        expect = p.to_dataset_space(p.ldm.decode(p.latents, quantize=True))

    def boom(*a, **k):
        raise AssertionError("the UNet must not run without diffusion")

    monkeypatch.setattr(p.ldm.unet, "forward", boom)
    x = p.decode()
    torch.testing.assert_close(x.detach(), expect)
    _loss(x).backward()
    assert p.latents.grad is not None and p.latents.grad.abs().sum() > 0
    assert p.class_embeddings.grad is None
    assert set(p.state_tensors()) == {"latents"}
    assert p.num_bytes() == 2 * 3 * 8 * 8 * 4 == ref.num_bytes() - 2 * 32 * 4
    assert p.config()["diffusion"] is False
    q = LatentDiffusionImages.from_state(spec_two, p.state_tensors(), p.config())
    assert q.diffusion is False and torch.equal(q.latents, p.latents)
    with torch.no_grad():
        torch.testing.assert_close(q.decode(), expect)


def test_c_only_freezes_z_and_changes_nothing_else(spec_two, tiny_dir):
    """Table 7 'c only': Z gets no gradient (grad stays None); c does; the images are the same as
    with both learnable, and storage is unchanged."""
    p = _build(spec_two, tiny_dir, learn="c", noise="fixed")
    both = _build(spec_two, tiny_dir, noise="fixed")
    x = p.decode()
    _loss(x).backward()
    assert p.latents.grad is None and not p.latents.requires_grad
    assert p.class_embeddings.grad is not None and p.class_embeddings.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(x.detach(), both.decode())
    assert p.num_bytes() == both.num_bytes()
    opt = p.optimizer_spec("distribution").build()
    z_before = p.latents.detach().clone()
    opt.step()
    assert torch.equal(p.latents.detach(), z_before)
    assert p.config()["learn"] == "c"
    q = LatentDiffusionImages.from_state(spec_two, p.state_tensors(), p.config())
    assert not q.latents.requires_grad
    with pytest.raises(ValueError, match="learn"):
        _build(spec_two, tiny_dir, learn="z_and_more")


def test_noise_init_of_c(spec_two, tiny_dir):
    """Table 8's noise initialisation: init_c='noise' draws c from N(0, 1) (Z is drawn as before) and
    init_from_real then sets Z only."""
    p = _build(spec_two, tiny_dir, ipc=40, init_c="noise")
    ref = _build(spec_two, tiny_dir, ipc=40)
    assert torch.equal(p.latents, ref.latents)
    rows = p.ldm.class_embedder.embedding.weight[p.labels]
    torch.testing.assert_close(ref.class_embeddings.detach(), rows)
    c = p.class_embeddings.detach()
    assert not torch.allclose(c, rows)
    assert abs(float(c.mean())) < 0.1 and abs(float(c.std()) - 1.0) < 0.1
    images = torch.randn(80, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    p.init_from_real(images, p.labels)
    ref.init_from_real(images, ref.labels)
    assert torch.equal(p.class_embeddings.detach(), c)
    torch.testing.assert_close(p.latents, ref.latents)
    with pytest.raises(ValueError, match="init_c"):
        _build(spec_two, tiny_dir, init_c="zeros")


def test_noise_init_of_z_and_c_are_the_generators_draws(spec_two, tiny_dir):
    """Table 8's noise initialisation of both Z and c (``init_c='noise'`` and no init_from_real, i.e.
    ``--init noise``): Z and c are the generator's N(0, 1) draws, in that order after the noise
    seed, recomputed here from the same seed; the default init_c keeps the same Z and takes c from
    the embedder's rows."""
    p = _build(spec_two, tiny_dir, ipc=3, seed=7, init_c="noise")
    g = torch.Generator().manual_seed(7)
    torch.randint(0, 2 ** 62, (1,), generator=g)                       # the noise seed
    z = torch.randn(p.latents.shape, generator=g)
    c = torch.randn(p.class_embeddings.shape, generator=g)
    assert torch.equal(p.latents.detach(), z)
    assert torch.equal(p.class_embeddings.detach(), c)
    q = _build(spec_two, tiny_dir, ipc=3, seed=7)
    assert torch.equal(q.latents.detach(), z)
    torch.testing.assert_close(q.class_embeddings.detach(), q.ldm.class_embedder.embedding.weight[q.labels])


def test_c_only_without_diffusion_is_refused(spec_two, tiny_dir):
    """'c only' freezes Z and 'w/o diffusion' does not use c: together nothing is learned."""
    with pytest.raises(ValueError, match="nothing to learn"):
        _build(spec_two, tiny_dir, learn="c", diffusion=False)


def test_budget_override_allows_and_reports_an_over_budget_run(tiny_dir):
    """8x8 gray images: a pixel budget of 64 floats per image against 3*8*8 + 32 = 224 stored floats."""
    small = DatasetSpec("small", 1, 8, 8, 2, (0.5,), (0.5,))
    p = _build(small, tiny_dir)
    with pytest.raises(BudgetError, match="over by"):
        check_budget(p, small, 1)
    q = _build(small, tiny_dir, budget_override=True)
    rep = check_budget(q, small, 1)
    assert rep.overridden and rep.used == 2 * 224 * 4 and rep.allowed == 2 * 64 * 4
    assert "OVER BUDGET" in str(rep)
    cfg = q.config()
    assert cfg["budget_override"] is True and cfg["pixel_budget_ratio"] == pytest.approx(224 / 64)
    # within budget nothing changes
    spec28 = DatasetSpec("x", 1, 28, 28, 2, (0.5,), (0.5,))
    assert not check_budget(_build(spec28, tiny_dir, budget_override=True), spec28, 1).overridden
