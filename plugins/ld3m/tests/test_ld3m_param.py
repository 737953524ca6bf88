"""The ld3m parameterization on the tiny random LDM: contract, gradients, storage, save/load."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from splatdd.plugin_api import DatasetSpec, check_plugin_class
from splatdd_ld3m import LatentDiffusionImages


def _build(spec, tiny_dir, ipc=1, seed=0, **kw):
    kw.setdefault("steps", 3)
    return LatentDiffusionImages.build(spec, ipc, generator=torch.Generator().manual_seed(seed),
                                       model_path=str(tiny_dir), **kw)


def test_plugin_class_is_valid():
    check_plugin_class(LatentDiffusionImages, "parameterization")
    assert LatentDiffusionImages.name == "ld3m"


def test_build_shapes_labels_and_bytes(spec_gray, tiny_dir):
    p = _build(spec_gray, tiny_dir, ipc=2)
    n = 20
    assert p.latents.shape == (n, 3, 8, 8) and p.class_embeddings.shape == (n, 32)
    assert p.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert p.class_indices(3).tolist() == [6, 7]
    # exact storage: latents + class embeddings, fp32; the LDM is not counted
    assert p.num_bytes() == n * (3 * 8 * 8 + 32) * 4
    st = p.state_tensors()
    assert set(st) == {"latents", "class_embeddings"}
    assert sum(t.numel() * t.element_size() for t in st.values()) == p.num_bytes()
    # only Z and c are learnable parameters of the module; the LDM stays outside
    assert {name for name, _ in p.named_parameters()} == {"latents", "class_embeddings"}
    assert set(p.state_dict()) == {"latents", "class_embeddings", "noise_pass"}
    # c starts as the embedder's row of each image's class
    w = p.ldm.class_embedder.embedding.weight
    torch.testing.assert_close(p.class_embeddings.detach(), w[p.labels])
    q = _build(spec_gray, tiny_dir, storage_dtype="bfloat16")
    assert q.num_bytes() == 10 * (3 * 8 * 8 + 32) * 2
    assert all(t.dtype == torch.bfloat16 for t in q.state_tensors().values())


def test_options_are_checked(spec_gray, spec_rgb, tiny_dir):
    with pytest.raises(TypeError, match="bogus"):
        _build(spec_gray, tiny_dir, bogus=1)
    with pytest.raises(ValueError, match="ZCA"):
        _build(DatasetSpec("c", 3, 32, 32, 10, (0.5,) * 3, (0.5,) * 3, zca=True), tiny_dir)
    with pytest.raises(ValueError, match="class_map"):
        _build(spec_rgb, tiny_dir, class_map=[0] * 9 + [50])
    with pytest.raises(ValueError, match="residual"):
        _build(spec_gray, tiny_dir, residual="maybe")
    with pytest.raises(ValueError, match="checkpointing"):
        _build(spec_gray, tiny_dir, checkpointing="sometimes")


def test_decode_shapes_subsets_and_resolution(spec_gray, tiny_dir):
    p = _build(spec_gray, tiny_dir, ipc=1, noise="fixed")
    with torch.no_grad():
        x = p.decode()
        assert x.shape == (10, 1, 28, 28) and torch.isfinite(x).all()
        sub = p.decode(torch.tensor([7, 2]))
        assert sub.shape == (2, 1, 28, 28)
        # fixed noise: a subset decodes to the same images as the full pass
        torch.testing.assert_close(sub, x[[7, 2]], rtol=1e-4, atol=1e-4)
        assert p.decode(resolution=(16, 20)).shape == (10, 1, 16, 20)
        assert p.decode(torch.tensor([], dtype=torch.long)).shape == (0, 1, 28, 28)
        # clamp=True: decoded pixels lie in the normalised image of [0, 1]
        lo, hi = (0 - 0.2860) / 0.3530, (1 - 0.2860) / 0.3530
        assert x.min() >= lo - 1e-5 and x.max() <= hi + 1e-5


def test_rgb_dataset_decodes_rgb(spec_rgb, tiny_dir):
    p = _build(spec_rgb, tiny_dir, ipc=1, steps=2)
    with torch.no_grad():
        assert p.decode(torch.tensor([0, 9])).shape == (2, 3, 32, 32)


def test_noise_modes(spec_gray, tiny_dir):
    per = _build(spec_gray, tiny_dir, noise="per_pass", steps=2)
    fix = _build(spec_gray, tiny_dir, noise="fixed", steps=2)
    idx = torch.tensor([0, 1])
    with torch.no_grad():
        a, b = per.decode(idx), per.decode(idx)
        assert not torch.allclose(a, b)          # a new z_T noise every pass
        assert int(per.noise_pass) == 2
        torch.testing.assert_close(fix.decode(idx), fix.decode(idx))


@pytest.mark.parametrize("steps", [10, 50])
def test_gradients_reach_latents_and_embeddings(spec_two, tiny_dir, steps):
    p = _build(spec_two, tiny_dir, ipc=1, steps=steps, noise="fixed")
    x = p.decode()
    loss = ((x - 0.3) ** 2).mean()
    loss.backward()
    for g in (p.latents.grad, p.class_embeddings.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    for row in range(2):  # every image gets a gradient
        assert p.latents.grad[row].abs().sum() > 0


def test_checkpointing_gives_the_same_gradients(spec_two, tiny_dir):
    grads = []
    for ckpt in (True, False, "reentrant"):
        p = _build(spec_two, tiny_dir, ipc=1, steps=6, noise="fixed", checkpointing=ckpt, seed=3)
        x = p.decode()
        (x.square().mean() + x.mean()).backward()
        grads.append((p.latents.grad.clone(), p.class_embeddings.grad.clone(), x.detach()))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_residual_switch_changes_only_the_sampler(spec_two, tiny_dir):
    a = _build(spec_two, tiny_dir, steps=4, noise="fixed", residual=True)
    b = _build(spec_two, tiny_dir, steps=4, noise="fixed", residual=False)
    c = _build(spec_two, tiny_dir, steps=4, noise="fixed", residual="x0")
    with torch.no_grad():
        xa, xb, xc = a.decode(), b.decode(), c.decode()
    assert not torch.allclose(xa, xb) and not torch.allclose(xa, xc)
    torch.testing.assert_close(a.latents, b.latents)


def test_init_from_real_encodes_images(spec_gray, tiny_dir):
    p = _build(spec_gray, tiny_dir, ipc=1)
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(10, 1, 28, 28, generator=g)
    diag = p.init_from_real(imgs, p.labels.clone())
    assert {"ae_mse", "latent_mean", "latent_std"} <= set(diag)
    with torch.no_grad():
        want = p.ldm.encode(p.to_ldm_space(imgs))
    torch.testing.assert_close(p.latents.detach(), want)
    with pytest.raises(ValueError, match="labels"):
        p.init_from_real(imgs, p.labels.flip(0))
    with pytest.raises(ValueError):
        p.init_from_real(imgs[:3], p.labels[:3])


def test_optimizer_spec(spec_gray, tiny_dir):
    p = _build(spec_gray, tiny_dir)
    for regime, lr in (("distribution", 1e-2), ("gradient", 1e-3), ("trajectory", 10.0), ("recover", 1e-2)):
        os_ = p.optimizer_spec(regime)
        assert os_.kind == "sgd" and os_.momentum == 0.5
        assert [g["lr"] for g in os_.params] == [lr, lr]
        assert os_.params[0]["params"][0] is p.latents and os_.params[1]["params"][0] is p.class_embeddings
    assert p.optimizer_spec("distribution", lr=0.5).params[0]["lr"] == 0.5
    opt = p.optimizer_spec("distribution").build()
    assert isinstance(opt, torch.optim.SGD)
    with pytest.raises(ValueError, match="unknown regime 'dm'"):
        p.optimizer_spec("dm")
    q = _build(spec_gray, tiny_dir, optimizer="adam")
    assert isinstance(q.optimizer_spec("trajectory").build(), torch.optim.Adam)
    assert q.optimizer_spec("recover").build().param_groups[0]["betas"] == (0.5, 0.9)


def test_one_optimisation_step_changes_the_images(spec_two, tiny_dir):
    # quantize=False: with the tiny model's coarse random codebook a small step rarely changes the
    # nearest code, so the (straight-through) quantised decode would look unchanged
    p = _build(spec_two, tiny_dir, steps=3, noise="fixed", clamp=False, quantize=False)
    opt = p.optimizer_spec("distribution", lr=100.0).build()
    x0 = p.decode()
    loss = ((x0 - 1.0) ** 2).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        assert ((p.decode() - 1.0) ** 2).mean() < loss


def test_save_load_round_trip(spec_gray, tiny_dir):
    p = _build(spec_gray, tiny_dir, ipc=1, steps=3, guidance=2.0, residual="x0")
    with torch.no_grad():
        p.latents.add_(0.25)
        p.class_embeddings.mul_(1.5)
    tensors, cfg = p.state_tensors(), p.config()
    import json

    cfg = json.loads(json.dumps(cfg))  # must be JSON-serialisable
    q = LatentDiffusionImages.from_state(spec_gray, tensors, cfg)
    torch.testing.assert_close(q.latents, p.latents)
    torch.testing.assert_close(q.class_embeddings, p.class_embeddings)
    assert (q.steps, q.guidance, q.residual, q.noise_seed) == (3, 2.0, "x0", p.noise_seed)
    with torch.no_grad():  # both at noise pass 0: the same z_T noise, the same images
        fresh = LatentDiffusionImages.from_state(spec_gray, tensors, cfg)
        torch.testing.assert_close(q.decode(), fresh.decode())
    bad = dict(tensors, latents=tensors["latents"][:3])
    with pytest.raises(ValueError, match="latents"):
        LatentDiffusionImages.from_state(spec_gray, bad, cfg)
    with pytest.raises(ValueError, match="class_embeddings"):
        LatentDiffusionImages.from_state(spec_gray, {"latents": tensors["latents"]}, cfg)
    with pytest.raises(ValueError, match="noise_seed"):
        LatentDiffusionImages.from_state(spec_gray, tensors, {k: v for k, v in cfg.items() if k != "noise_seed"})


def test_model_hash_is_checked(spec_gray, tiny_dir, tmp_path, monkeypatch):
    from splatdd_ld3m.tiny import build_tiny_ldm

    p = _build(spec_gray, tiny_dir, steps=2)
    cfg = dict(p.config(), model_config_hash="0" * 64)
    with pytest.raises(ValueError, match="SPLATDD_LD3M_MODEL"):
        LatentDiffusionImages.from_state(spec_gray, p.state_tensors(), cfg)
    # the model moved: the environment variable points at it
    other = build_tiny_ldm(tmp_path / "moved", num_classes=10, image_size=32, channels=3)
    cfg = dict(p.config(), model_path=str(tmp_path / "gone"))
    monkeypatch.setenv("SPLATDD_LD3M_MODEL", str(other))
    q = LatentDiffusionImages.from_state(spec_gray, p.state_tensors(), cfg)
    assert q.ldm.path == str(other.resolve())


def test_default_tiny_model_is_built_on_demand(spec_gray):
    with pytest.warns(UserWarning, match="RANDOM weights"):
        p = LatentDiffusionImages.build(spec_gray, 1, steps=2)  # model_path="tiny"
    assert p.model_path == "tiny" and p.config()["tiny"]["channels"] == 1
    assert p.ldm.image_channels == 1
    q = LatentDiffusionImages.from_state(spec_gray, p.state_tensors(), p.config())
    assert q.ldm.config_hash == p.ldm.config_hash
    with torch.no_grad():
        assert q.decode(torch.tensor([0])).shape == (1, 1, 28, 28)


def test_deepcopy_shares_the_frozen_model(spec_gray, tiny_dir):
    p = _build(spec_gray, tiny_dir)
    q = copy.deepcopy(p)
    assert q.ldm is p.ldm and q.latents is not p.latents
    assert not any(t.requires_grad for t in p.ldm.parameters())


def test_via_distilled_file(spec_gray, tiny_dir, tmp_path):
    df = pytest.importorskip("splatdd.distilled_file")
    p = _build(spec_gray, tiny_dir, steps=2)
    path = tmp_path / "ld3m.safetensors"
    try:
        df.save(path, p, spec=spec_gray, ipc=1, algorithm="dm", algo_config={}, learned_lr=None, extra_meta={})
        d = df.load(path)
    except (ImportError, LookupError) as e:  # registry cannot find the plugin (not installed)
        pytest.skip(f"distilled_file cannot resolve the ld3m plugin here: {e}")
    assert isinstance(d.param, LatentDiffusionImages)
    torch.testing.assert_close(d.param.latents, p.latents)
    torch.testing.assert_close(d.param.class_embeddings, p.class_embeddings)
    assert os.path.getsize(path) >= p.num_bytes()
