"""Loading an LDM directory, clear errors for bad paths, and the CompVis checkpoint converter."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from splatdd_ld3m.cli import main as cli_main
from splatdd_ld3m.convert import ConversionError, compvis_to_diffusers_parts
from splatdd_ld3m.ldm import ClassConditionalLDM, load_ldm
from splatdd_ld3m.tiny import (build_tiny_compvis_checkpoint, make_tiny_parts, tiny_unet_compvis_params,
                               tiny_vae_compvis_params)


# ---------------------------------------------------------------------------------------------
# an independent description of the CompVis key names and shapes, written from the structure of
# ldm/modules/diffusionmodules/openaimodel.py (UNetModel.__init__'s block loop) and the taming
# Encoder/Decoder, NOT from splatdd_ld3m.convert's tables
# ---------------------------------------------------------------------------------------------
def _resblock(pre, cin, cout, emb):
    k = {f"{pre}.in_layers.0.weight": (cin,), f"{pre}.in_layers.0.bias": (cin,),
         f"{pre}.in_layers.2.weight": (cout, cin, 3, 3), f"{pre}.in_layers.2.bias": (cout,),
         f"{pre}.emb_layers.1.weight": (cout, emb), f"{pre}.emb_layers.1.bias": (cout,),
         f"{pre}.out_layers.0.weight": (cout,), f"{pre}.out_layers.0.bias": (cout,),
         f"{pre}.out_layers.3.weight": (cout, cout, 3, 3), f"{pre}.out_layers.3.bias": (cout,)}
    if cin != cout:
        k.update({f"{pre}.skip_connection.weight": (cout, cin, 1, 1), f"{pre}.skip_connection.bias": (cout,)})
    return k


def _spatial_transformer(pre, ch, ctx):
    k = {f"{pre}.norm.weight": (ch,), f"{pre}.norm.bias": (ch,), f"{pre}.proj_in.weight": (ch, ch, 1, 1),
         f"{pre}.proj_in.bias": (ch,), f"{pre}.proj_out.weight": (ch, ch, 1, 1), f"{pre}.proj_out.bias": (ch,)}
    b = f"{pre}.transformer_blocks.0"
    for a, kv in (("attn1", ch), ("attn2", ctx)):
        k.update({f"{b}.{a}.to_q.weight": (ch, ch), f"{b}.{a}.to_k.weight": (ch, kv),
                  f"{b}.{a}.to_v.weight": (ch, kv), f"{b}.{a}.to_out.0.weight": (ch, ch),
                  f"{b}.{a}.to_out.0.bias": (ch,)})
    k.update({f"{b}.ff.net.0.proj.weight": (8 * ch, ch), f"{b}.ff.net.0.proj.bias": (8 * ch,),
              f"{b}.ff.net.2.weight": (ch, 4 * ch), f"{b}.ff.net.2.bias": (ch,)})
    for n in (1, 2, 3):
        k.update({f"{b}.norm{n}.weight": (ch,), f"{b}.norm{n}.bias": (ch,)})
    return k


def expected_unet_keys(p):
    mc, emb, ctx = p["model_channels"], 4 * p["model_channels"], p["context_dim"]
    k = {"time_embed.0.weight": (emb, mc), "time_embed.0.bias": (emb,), "time_embed.2.weight": (emb, emb),
         "time_embed.2.bias": (emb,), "input_blocks.0.0.weight": (mc, p["in_channels"], 3, 3),
         "input_blocks.0.0.bias": (mc,)}
    chans, ch, ds, idx = [mc], mc, 1, 1
    for level, mult in enumerate(p["channel_mult"]):
        for _ in range(p["num_res_blocks"]):
            k.update(_resblock(f"input_blocks.{idx}.0", ch, mult * mc, emb))
            ch = mult * mc
            if ds in p["attention_resolutions"]:
                k.update(_spatial_transformer(f"input_blocks.{idx}.1", ch, ctx))
            chans.append(ch)
            idx += 1
        if level != len(p["channel_mult"]) - 1:
            k.update({f"input_blocks.{idx}.0.op.weight": (ch, ch, 3, 3), f"input_blocks.{idx}.0.op.bias": (ch,)})
            chans.append(ch)
            idx += 1
            ds *= 2
    k.update(_resblock("middle_block.0", ch, ch, emb))
    k.update(_spatial_transformer("middle_block.1", ch, ctx))
    k.update(_resblock("middle_block.2", ch, ch, emb))
    idx = 0
    for level, mult in list(enumerate(p["channel_mult"]))[::-1]:
        for i in range(p["num_res_blocks"] + 1):
            k.update(_resblock(f"output_blocks.{idx}.0", ch + chans.pop(), mc * mult, emb))
            ch = mc * mult
            layers = 1
            if ds in p["attention_resolutions"]:
                k.update(_spatial_transformer(f"output_blocks.{idx}.1", ch, ctx))
                layers = 2
            if level and i == p["num_res_blocks"]:
                k.update({f"output_blocks.{idx}.{layers}.conv.weight": (ch, ch, 3, 3),
                          f"output_blocks.{idx}.{layers}.conv.bias": (ch,)})
                ds //= 2
            idx += 1
    k.update({"out.0.weight": (mc,), "out.0.bias": (mc,), "out.2.weight": (p["out_channels"], mc, 3, 3),
              "out.2.bias": (p["out_channels"],)})
    return k


def _vae_resnet(pre, cin, cout):
    k = {f"{pre}.norm1.weight": (cin,), f"{pre}.norm1.bias": (cin,), f"{pre}.conv1.weight": (cout, cin, 3, 3),
         f"{pre}.conv1.bias": (cout,), f"{pre}.norm2.weight": (cout,), f"{pre}.norm2.bias": (cout,),
         f"{pre}.conv2.weight": (cout, cout, 3, 3), f"{pre}.conv2.bias": (cout,)}
    if cin != cout:
        k.update({f"{pre}.nin_shortcut.weight": (cout, cin, 1, 1), f"{pre}.nin_shortcut.bias": (cout,)})
    return k


def _vae_mid(pre, c):
    k = {**_vae_resnet(f"{pre}.mid.block_1", c, c), **_vae_resnet(f"{pre}.mid.block_2", c, c)}
    k.update({f"{pre}.mid.attn_1.norm.weight": (c,), f"{pre}.mid.attn_1.norm.bias": (c,)})
    for n in ("q", "k", "v", "proj_out"):
        k.update({f"{pre}.mid.attn_1.{n}.weight": (c, c, 1, 1), f"{pre}.mid.attn_1.{n}.bias": (c,)})
    return k


def expected_vq_keys(vp):
    dd = vp["ddconfig"]
    ch, mult, nrb, z, e = dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"], vp["embed_dim"]
    k = {"encoder.conv_in.weight": (ch, dd["in_channels"], 3, 3), "encoder.conv_in.bias": (ch,)}
    cin = ch
    for i, m in enumerate(mult):
        for j in range(nrb):
            k.update(_vae_resnet(f"encoder.down.{i}.block.{j}", cin, ch * m))
            cin = ch * m
        if i != len(mult) - 1:
            k.update({f"encoder.down.{i}.downsample.conv.weight": (cin, cin, 3, 3),
                      f"encoder.down.{i}.downsample.conv.bias": (cin,)})
    k.update(_vae_mid("encoder", cin))
    k.update({"encoder.norm_out.weight": (cin,), "encoder.norm_out.bias": (cin,),
              "encoder.conv_out.weight": (z, cin, 3, 3), "encoder.conv_out.bias": (z,)})
    k.update({"quant_conv.weight": (e, z, 1, 1), "quant_conv.bias": (e,), "post_quant_conv.weight": (z, e, 1, 1),
              "post_quant_conv.bias": (z,), "quantize.embedding.weight": (vp["n_embed"], e)})
    cin = ch * mult[-1]
    k.update({"decoder.conv_in.weight": (cin, z, 3, 3), "decoder.conv_in.bias": (cin,)})
    k.update(_vae_mid("decoder", cin))
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            k.update(_vae_resnet(f"decoder.up.{i}.block.{j}", cin, ch * mult[i]))
            cin = ch * mult[i]
        if i != 0:
            k.update({f"decoder.up.{i}.upsample.conv.weight": (cin, cin, 3, 3),
                      f"decoder.up.{i}.upsample.conv.bias": (cin,)})
    k.update({"decoder.norm_out.weight": (cin,), "decoder.norm_out.bias": (cin,),
              "decoder.conv_out.weight": (dd["out_ch"], cin, 3, 3), "decoder.conv_out.bias": (dd["out_ch"],)})
    return k


# ---------------------------------------------------------------------------------------------
def test_load_diffusers_directory(tiny_dir):
    ldm = load_ldm(tiny_dir)
    assert isinstance(ldm, ClassConditionalLDM)
    assert (ldm.vae_kind, ldm.conditioning) == ("vq", "cross_attention")
    assert (ldm.latent_channels, ldm.latent_size, ldm.vae_factor, ldm.image_size) == (3, 8, 4, 32)
    assert (ldm.class_embedder.num_classes, ldm.class_embedder.null_class) == (10, 10)
    assert not any(p.requires_grad for p in ldm.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = ldm.encode(x)
        assert z.shape == (2, 3, 8, 8)
        assert ldm.decode(z).shape == (2, 3, 32, 32)
        assert ldm.model_output(z, 901, ldm.embed(torch.tensor([1, 2]))).shape == (2, 3, 8, 8)


def test_missing_and_malformed_paths(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="vae/"):
        load_ldm(tmp_path / "nope")
    ck = tmp_path / "model.ckpt"
    ck.write_bytes(b"x")
    with pytest.raises(ValueError, match="convert-ldm"):
        load_ldm(ck)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    shutil.rmtree(bad / "class_embedder")
    with pytest.raises(FileNotFoundError, match="class_embedder"):
        load_ldm(bad)
    shutil.copytree(tiny_dir / "class_embedder", bad / "class_embedder")
    (bad / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="unet.*not valid JSON"):
        load_ldm(bad)
    cfg = json.loads((tiny_dir / "unet" / "config.json").read_text())
    (bad / "unet" / "config.json").write_text(json.dumps(dict(cfg, _class_name="ControlNetModel")))
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        load_ldm(bad)
    (bad / "unet" / "config.json").write_text(json.dumps(cfg))
    (bad / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights"):
        load_ldm(bad)


def test_unet2dmodel_variant_loads_and_decodes(tmp_path, spec_gray):
    from splatdd_ld3m import LatentDiffusionImages
    from splatdd_ld3m.tiny import build_tiny_ldm

    d = build_tiny_ldm(tmp_path / "t2d", unet="time_embedding", vae="kl", channels=1)
    ldm = load_ldm(d)
    assert (ldm.conditioning, ldm.vae_kind) == ("time_embedding", "kl")
    p = LatentDiffusionImages.build(spec_gray, 1, model_path=str(d), steps=3, noise="fixed")
    x = p.decode(torch.tensor([0, 5]))
    assert x.shape == (2, 1, 28, 28)
    x.sum().backward()
    assert p.class_embeddings.grad.abs().sum() > 0 and p.latents.grad.abs().sum() > 0


def test_fake_compvis_checkpoint_has_the_compvis_keys(tmp_path):
    ckpt, yml = build_tiny_compvis_checkpoint(tmp_path / "tiny-cin.ckpt", num_classes=10)
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    up, vp = tiny_unet_compvis_params(), tiny_vae_compvis_params(3, 32)
    want = {"model.diffusion_model." + k: s for k, s in expected_unet_keys(up).items()}
    want.update({"first_stage_model." + k: s for k, s in expected_vq_keys(vp).items()})
    want["cond_stage_model.embedding.weight"] = (11, 32)
    got = {k: tuple(v.shape) for k, v in sd.items() if "." in k}
    assert got == want
    assert yml.is_file() and "betas" in sd


def test_convert_compvis_checkpoint_via_cli(tmp_path, capsys):
    ckpt, yml = build_tiny_compvis_checkpoint(tmp_path / "tiny-cin.ckpt", num_classes=10, seed=4)
    out = tmp_path / "converted"
    assert cli_main(["convert-ldm", str(ckpt), str(out), "--config", str(yml)]) == 0
    assert "10 classes + null class 10" in capsys.readouterr().out
    ldm = load_ldm(out)
    ref = make_tiny_parts(10, 32, 3, seed=4)
    for name in ("unet", "vae"):
        a, b = getattr(ldm, name).state_dict(), ref[name].state_dict()
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(ldm.class_embedder.embedding.weight, ref["class_embedder"].embedding.weight)
    # same schedule as the cin256 formula (the checkpoint's betas agree with the yaml)
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()).get("trained_betas") is None
    torch.testing.assert_close(ldm.alphas_cumprod.float(), ref["scheduler"].alphas_cumprod.float())
    z = torch.randn(2, 3, 8, 8)
    c = ldm.embed(torch.tensor([0, 3]))
    with torch.no_grad():
        ref["unet"].eval()
        torch.testing.assert_close(ldm.model_output(z, 501, c),
                                   ref["unet"](z, torch.tensor([501, 501]), encoder_hidden_states=c[:, None]).sample)
    # refuses to overwrite, and the yaml next to the checkpoint is found without --config
    assert cli_main(["convert-ldm", str(ckpt), str(out)]) == 2
    assert cli_main(["convert-ldm", str(ckpt), str(tmp_path / "second")]) == 0


def test_convert_errors(tmp_path):
    ckpt, yml = build_tiny_compvis_checkpoint(tmp_path / "m.ckpt", num_classes=10)
    with pytest.raises(FileNotFoundError, match="yaml"):
        from splatdd_ld3m.convert import convert_compvis_checkpoint

        convert_compvis_checkpoint(ckpt, tmp_path / "o1", tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError):
        convert_compvis_checkpoint(tmp_path / "missing.ckpt", tmp_path / "o2", yml)
    torch.save({"state_dict": {"foo.weight": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="model.diffusion_model"):
        convert_compvis_checkpoint(tmp_path / "other.ckpt", tmp_path / "o3", yml)
    import yaml

    cfg = yaml.safe_load(yml.read_text())
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    wrong = json.loads(json.dumps(cfg))
    wrong["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    with pytest.raises(ConversionError, match="does not match"):
        compvis_to_diffusers_parts(sd, wrong)
    wrong = json.loads(json.dumps(cfg))
    wrong["model"]["params"]["conditioning_key"] = "concat"
    with pytest.raises(ConversionError, match="crossattn"):
        compvis_to_diffusers_parts(sd, wrong)
    extra = dict(sd, **{"model.diffusion_model.input_blocks.99.0.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="no counterpart"):
        compvis_to_diffusers_parts(extra, cfg)
    # the CLI reports errors instead of tracebacks
    assert cli_main(["convert-ldm", str(tmp_path / "missing.ckpt"), str(tmp_path / "o4"), "--config",
                     str(yml)]) == 2


def test_kl_checkpoint_converts(tmp_path):
    ckpt, yml = build_tiny_compvis_checkpoint(tmp_path / "kl.ckpt", num_classes=10, vae="kl")
    out = tmp_path / "kl"
    assert cli_main(["convert-ldm", str(ckpt), str(out)]) == 0
    ldm = load_ldm(out)
    ref = make_tiny_parts(10, 32, 3, seed=0, vae="kl")
    for k, v in ref["vae"].state_dict().items():
        torch.testing.assert_close(ldm.vae.state_dict()[k], v, rtol=0, atol=0)


# the CompVis cin256-v2 config (configs/latent-diffusion/cin256-v2.yaml), as data
CIN256_UNET = dict(image_size=64, in_channels=3, out_channels=3, model_channels=192,
                   attention_resolutions=[8, 4, 2], num_res_blocks=2, channel_mult=[1, 2, 3, 5], num_heads=1,
                   use_spatial_transformer=True, transformer_depth=1, context_dim=512)
CIN256_VAE = dict(embed_dim=3, n_embed=8192,
                  ddconfig=dict(double_z=False, z_channels=3, resolution=256, in_channels=3, out_ch=3, ch=128,
                                ch_mult=[1, 2, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0))


def test_cin256_layout_maps_onto_diffusers_exactly():
    """For the real cin256-v2 architecture (built on the meta device: shapes only, no memory), the
    diffusers models our configs describe have exactly the CompVis key names and shapes under our
    mapping, and one attention head of the full width, as the CompVis UNet (num_heads 1)."""
    from diffusers import UNet2DConditionModel, VQModel

    from splatdd_ld3m.convert import (_map_state, unet_config_from_compvis, unet_module_table,
                                      vae_config_from_compvis, vae_module_table)

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config_from_compvis(CIN256_UNET))
        vae = VQModel(**vae_config_from_compvis(CIN256_VAE, "vq"))
    got = {k: tuple(v.shape) for k, v in
           _map_state(unet.state_dict(), unet_module_table(CIN256_UNET), reverse=True, what="unet").items()}
    assert got == expected_unet_keys(CIN256_UNET)
    got = {k: tuple(v.shape) for k, v in
           _map_state(vae.state_dict(), vae_module_table(CIN256_VAE["ddconfig"], "vq"), reverse=True,
                      what="vae").items()}
    assert got == expected_vq_keys(CIN256_VAE)
    attn = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert attn.heads == 1 and attn.to_q.out_features == 384
    assert vae.config.scaling_factor == 1.0 and 2 ** (len(vae.config.block_out_channels) - 1) == 4
