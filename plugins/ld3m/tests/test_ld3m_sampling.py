"""The reverse-process maths: Eq. 7 on hand-set tensors, equality with diffusers' DDIM step, CFG."""
from __future__ import annotations

import math

import pytest
import torch

from splatdd_ld3m.sampling import (DDIMStep, ddim_schedule, guided_output, ld3m_step, normalize_residual,
                                   residual_weight, reverse_process)
from splatdd_ld3m.tiny import CIN_SCHEDULE


def _sched():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**CIN_SCHEDULE)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("t", [10, 7, 1])
def test_eq7_step_on_hand_set_tensors(t):
    T = 10
    z_t, eps, z_T = _rand(2, 3, 4, 4, seed=1), _rand(2, 3, 4, 4, seed=2), _rand(2, 3, 4, 4, seed=3)
    a, ap = 0.5, 0.8
    st = DDIMStep(k=T - t, t=t, timestep=500, alpha=a, alpha_prev=ap, sigma=0.0)
    got = ld3m_step(z_t, eps, z_T, st, T, residual="eq7")
    # by hand: DDIM mean, then the weighted average with z_T, weight t/T
    x0 = (z_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    mu = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps
    want = (1 - t / T) * mu + (t / T) * z_T
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert residual_weight(st, T, "eq7") == t / T
    if t == T:  # weight 1: the first step returns z_T exactly
        torch.testing.assert_close(got, z_T, rtol=0, atol=0)


def test_eq7_step_with_noise():
    T, t = 4, 2
    z_t, eps, z_T, nz = (_rand(1, 3, 2, 2, seed=s) for s in range(4))
    a, ap, sig = 0.3, 0.6, 0.2
    st = DDIMStep(k=T - t, t=t, timestep=10, alpha=a, alpha_prev=ap, sigma=sig)
    got = ld3m_step(z_t, eps, z_T, st, T, residual="eq7", noise=nz)
    x0 = (z_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    mu = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sig ** 2) * eps
    torch.testing.assert_close(got, 0.5 * mu + 0.5 * z_T + sig * nz, rtol=0, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_residual_off_equals_diffusers_ddim_step(eta):
    sched = _sched()
    T = 10
    table = ddim_schedule(sched, T, eta=eta)
    ref = _sched()
    ref.set_timesteps(T)
    assert [s.timestep for s in table] == [int(x) for x in ref.timesteps] == list(range(901, 0, -100))
    z = _rand(2, 3, 8, 8, seed=5).float()
    for st in table:
        out = _rand(2, 3, 8, 8, seed=100 + st.k).float()
        nz = _rand(2, 3, 8, 8, seed=200 + st.k).float()
        want = ref.step(out, st.timestep, z, eta=eta, variance_noise=nz if eta > 0 else None).prev_sample
        got = ld3m_step(z, out, torch.full_like(z, float("nan")), st, T, residual="none", noise=nz)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        z = want
    # CompVis DDIM: the last step goes to alphas_cumprod[0] (set_alpha_to_one=False)
    assert table[-1].alpha_prev == pytest.approx(float(sched.alphas_cumprod[0]))


@pytest.mark.parametrize("pred", ["v_prediction", "sample"])
def test_other_parameterisations_match_diffusers(pred):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(**dict(CIN_SCHEDULE, prediction_type=pred))
    table = ddim_schedule(DDIMScheduler(**dict(CIN_SCHEDULE, prediction_type=pred)), 5)
    ref.set_timesteps(5)
    z = torch.randn(1, 3, 4, 4)
    out = torch.randn(1, 3, 4, 4)
    st = table[2]
    want = ref.step(out, st.timestep, z).prev_sample
    got = ld3m_step(z, out, z, st, 5, residual="none", prediction_type=pred)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_x0_variant_formula():
    T = 5
    z_t, out, z_ref = (_rand(1, 3, 2, 2, seed=s) for s in (7, 8, 9))
    st = DDIMStep(k=1, t=4, timestep=601, alpha=0.2, alpha_prev=0.4, sigma=0.0)
    w = (T - 1 - 1) / (T - 1)
    got = ld3m_step(z_t, out, None, st, T, residual="x0", z_ref=z_ref)
    x0 = (z_t - math.sqrt(0.8) * out) / math.sqrt(0.2)
    x0 = (1 - w) * x0 + w * z_ref
    torch.testing.assert_close(got, math.sqrt(0.4) * x0 + math.sqrt(0.6) * out, rtol=0, atol=1e-12)


def test_normalize_residual():
    assert normalize_residual(True) == "eq7" and normalize_residual(False) == "none"
    assert normalize_residual("X0") == "x0" and normalize_residual("off") == "none"
    with pytest.raises(ValueError):
        normalize_residual("sometimes")


class _FakeLDM:
    """A linear stand-in denoiser: out = 0.3 z + mean(c) (+ counts calls)."""

    def __init__(self):
        self.calls = 0
        self.null = torch.full((4,), -1.0, dtype=torch.float64)

    def model_output(self, z, timestep, cond):
        self.calls += 1
        return 0.3 * z + cond.mean(1).view(-1, 1, 1, 1) + 1e-4 * timestep

    def null_embedding(self):
        return self.null


def test_guidance_formula():
    ldm = _FakeLDM()
    z, c = _rand(3, 2, 2, 2, seed=1), _rand(3, 4, seed=2)
    got = guided_output(ldm, z, c, 10, 3.0, ldm.null)
    out_c = ldm.model_output(z, 10, c)
    out_u = ldm.model_output(z, 10, ldm.null.expand(3, -1))
    torch.testing.assert_close(got, out_u + 3.0 * (out_c - out_u))
    torch.testing.assert_close(guided_output(ldm, z, c, 10, 1.0, ldm.null), out_c)


@pytest.mark.parametrize("residual", ["eq7", "none"])
def test_reverse_process_matches_manual_loop(residual):
    sched = _sched()
    T = 6
    table = ddim_schedule(sched, T)
    ldm = _FakeLDM()
    z_T, c = _rand(2, 2, 3, 3, seed=3), _rand(2, 4, seed=4)
    got = reverse_process(ldm, z_T, c, table, guidance=2.0, residual=residual, checkpointing=False)
    # eq7 skips the denoiser at t = T (its output has weight 0)
    assert ldm.calls == (T - 1 if residual == "eq7" else T)
    z = z_T
    for st in table:
        out = guided_output(_FakeLDM(), z, c, st.timestep, 2.0, ldm.null)
        z = ld3m_step(z, out, z_T, st, T, residual=residual)
    torch.testing.assert_close(got, z, rtol=1e-12, atol=1e-12)
