"""Registry: listing without importing, lazy validated loading, broken/unknown plugins,
direct registration, command plugins."""
import sys
import textwrap

import pytest
import torch

from splatdd import registry as R
from splatdd.plugin_api import PLUGIN_API_VERSION, Algorithm, Parameterization
from splatdd.testing import TinyPixels

GOOD = """
from splatdd.plugin_api import Parameterization, Algorithm
from splatdd.testing import TinyPixels
LOADED = True
class FakeParam(TinyPixels):
    name = "fakeparam"
class FakeAlgo(Algorithm):
    name = "fakealgo"
    regime = "distribution"
    default_iterations = 7
    def loss(self, param, step):
        return param.decode().sum()
class Misnamed(TinyPixels):
    name = "something_else"
class OldAPI(FakeAlgo):
    name = "oldapi"
    api_version = 0
class HalfDone(Parameterization):
    name = "halfdone"
    def decode(self, indices=None, *, resolution=None):
        return None
NotAClass = 3
def register(subparsers):
    sp = subparsers.add_parser("fakecmd")
    sp.set_defaults(func=lambda args: 0)
"""


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """A fake installed distribution 'splatdd-fake' 0.3.1 in tmp_path, on sys.path."""
    mod = f"fake_plugins_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{mod}.py").write_text(GOOD)
    (tmp_path / f"{mod}_broken.py").write_text("raise ImportError('needs libfoo')\n")
    info = tmp_path / "splatdd_fake-0.3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: splatdd-fake\nVersion: 0.3.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(f"""
        [splatdd.parameterizations]
        fakeparam = {mod}:FakeParam
        broken = {mod}_broken:Thing
        misnamed = {mod}:Misnamed
        notaclass = {mod}:NotAClass
        halfdone = {mod}:HalfDone

        [splatdd.algorithms]
        fakealgo = {mod}:FakeAlgo
        oldapi = {mod}:OldAPI

        [splatdd.commands]
        fakecmd = {mod}:register
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield mod, tmp_path
    for m in (mod, f"{mod}_broken"):
        sys.modules.pop(m, None)


def test_list_without_import(fake_dist):
    mod, path = fake_dist
    reg = R.Registry(path=[str(path)])
    infos = reg.list_plugins("parameterization")
    assert [i.name for i in infos] == ["broken", "fakeparam", "halfdone", "misnamed",
                                       "notaclass"]
    fp = next(i for i in infos if i.name == "fakeparam")
    assert fp.distribution == "splatdd-fake" and fp.version == "0.3.1"
    assert fp.value == f"{mod}:FakeParam" and fp.kind == "parameterization" and fp.active
    assert [i.name for i in reg.list_plugins("algo")] == ["fakealgo", "oldapi"]
    assert mod not in sys.modules and f"{mod}_broken" not in sys.modules


def test_default_sys_path_discovery(fake_dist):
    mod, _ = fake_dist
    reg = R.Registry()                       # reads sys.path, which now has the fake dist
    assert "fakeparam" in reg.names("parameterization")
    assert mod not in sys.modules
    cls = reg.get_parameterization("fakeparam")
    assert cls.name == "fakeparam" and issubclass(cls, Parameterization)
    assert reg.get_algorithm("fakealgo").default_iterations == 7
    assert reg.get_parameterization("fakeparam") is cls          # cached


def test_broken_plugins_reported_others_load(fake_dist):
    _, path = fake_dist
    reg = R.Registry(path=[str(path)])
    with pytest.raises(R.PluginLoadError) as e:
        reg.get_parameterization("broken")
    assert "broken" in str(e.value) and "needs libfoo" in str(e.value)
    assert isinstance(e.value.original, ImportError) and e.value.distribution == "splatdd-fake"
    assert "ImportError" in e.value.format_original()
    with pytest.raises(R.PluginLoadError, match="something_else"):
        reg.get_parameterization("misnamed")
    with pytest.raises(R.PluginLoadError, match="subclass"):
        reg.get_parameterization("notaclass")
    with pytest.raises(R.PluginLoadError, match="plugin API v0"):
        reg.get_algorithm("oldapi")
    # an incomplete class is refused at load time, naming every missing method (not `decode`)
    with pytest.raises(R.PluginLoadError) as e:
        reg.get_parameterization("halfdone")
    msg = str(e.value.original)
    assert "abstract" in msg and "'halfdone'" in msg and "decode," not in msg
    assert ("build, config, from_state, init_from_real, labels, num_bytes, optimizer_spec, "
            "state_tensors") in msg
    # the healthy one still loads, and load_all skips the broken ones
    assert reg.get_parameterization("fakeparam").name == "fakeparam"
    loaded = reg.load_all("parameterization")
    assert set(loaded) == {"fakeparam"}
    errs = reg.load_errors()
    assert set(errs) == {("parameterization", "broken"), ("parameterization", "misnamed"),
                         ("parameterization", "notaclass"), ("parameterization", "halfdone"),
                         ("algorithm", "oldapi")}
    assert set(reg.load_errors("algorithm")) == {("algorithm", "oldapi")}
    # a second attempt re-raises the remembered error without re-importing
    with pytest.raises(R.PluginLoadError):
        reg.get_parameterization("broken")


def test_unknown_plugin(fake_dist):
    _, path = fake_dist
    reg = R.Registry(path=[str(path)])
    with pytest.raises(R.UnknownPluginError) as e:
        reg.get_parameterization("nope")
    assert isinstance(e.value, KeyError)
    msg = str(e.value)
    assert "nope" in msg and "fakeparam" in msg and "broken" in msg
    with pytest.raises(ValueError, match="unknown plugin kind"):
        reg.list_plugins("widgets")


def test_command_plugins(fake_dist):
    import argparse
    _, path = fake_dist
    reg = R.Registry(path=[str(path)])
    cmds = reg.load_all("command")
    assert set(cmds) == {"fakecmd"}
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    cmds["fakecmd"](sub)
    assert p.parse_args(["fakecmd"]).func(None) == 0


class MyParam(TinyPixels):
    name = "myparam"


class MyAlgo(Algorithm):
    name = "myalgo"
    regime = "gradient"

    def loss(self, param, step):
        return param.decode().sum()


def test_direct_registration_isolated():
    reg = R.Registry(entry_points=False)
    assert reg.list_plugins("parameterization") == []
    reg.register("parameterization", MyParam)
    assert reg.get_parameterization("myparam") is MyParam
    (info,) = reg.list_plugins("parameterization")
    assert info.source == "registered" and info.name == "myparam"
    with pytest.raises(ValueError, match="already registered"):
        reg.register("parameterization", MyParam)
    reg.unregister("parameterization", "myparam")
    with pytest.raises(R.UnknownPluginError):
        reg.get_parameterization("myparam")
    with reg.registered("algorithm", MyAlgo):
        assert reg.get_algorithm("myalgo") is MyAlgo
    with pytest.raises(R.UnknownPluginError):
        reg.get_algorithm("myalgo")
    # other registries (and the default one) are unaffected
    assert "myalgo" not in R.Registry(entry_points=False).names("algorithm")
    assert "myparam" not in R.default_registry().names("parameterization")


def test_register_validates():
    reg = R.Registry(entry_points=False)
    with pytest.raises(TypeError):
        reg.register("parameterization", MyAlgo)

    class Old(Parameterization):
        name = "old"
        api_version = PLUGIN_API_VERSION + 1
    with pytest.raises(ValueError, match="plugin API"):
        reg.register("parameterization", Old)
    with pytest.raises(ValueError, match="declares name"):
        reg.register("parameterization", MyParam, name="other")


def test_register_refuses_abstract_classes_naming_the_missing_methods():
    reg = R.Registry(entry_points=False)

    class NoLoss(Algorithm):
        name = "noloss"
        regime = "distribution"
    with pytest.raises(TypeError) as e:
        reg.register("algorithm", NoLoss)
    msg = str(e.value)
    assert "'noloss'" in msg and "is abstract" in msg and "does not implement loss" in msg
    assert "splatdd.plugin_api.Algorithm" in msg

    class OnlyDecode(Parameterization):
        name = "onlydecode"

        def decode(self, indices=None, *, resolution=None):
            return None
    with pytest.raises(TypeError, match=r"does not implement build, config, from_state, "
                                        r"init_from_real, labels, num_bytes, optimizer_spec, "
                                        r"state_tensors \("):
        reg.register("parameterization", OnlyDecode)
    assert reg.names("algorithm") == [] and reg.names("parameterization") == []


@pytest.mark.parametrize("regime", ["", "dm", "Distribution", None, 3])
def test_register_refuses_an_algorithm_without_a_valid_regime(regime):
    class Bad(MyAlgo):
        name = "bad"
    Bad.regime = regime
    with pytest.raises(ValueError) as e:
        R.Registry(entry_points=False).register("algorithm", Bad)
    msg = str(e.value)
    assert "'bad'" in msg and "regime" in msg and repr(regime) in msg
    assert "distribution, gradient, trajectory, recover" in msg


def test_register_checks_the_lr_schedule():
    class Cos(MyAlgo):
        name = "cos"
        lr_schedule = "cosine"
    R.Registry(entry_points=False).register("algorithm", Cos)

    class Step(MyAlgo):
        name = "step"
        lr_schedule = "step"
    with pytest.raises(ValueError, match="lr_schedule.*constant, cosine.*'step'"):
        R.Registry(entry_points=False).register("algorithm", Step)


def test_every_installed_algorithm_declares_a_valid_regime():
    """The built-in algorithms pass the same registration checks as a third party's."""
    from splatdd.plugin_api import REGIMES
    reg = R.Registry()
    algos = reg.load_all("algorithm")
    assert not reg.load_errors("algorithm"), reg.load_errors("algorithm")
    for name, cls in algos.items():
        assert cls.regime in REGIMES, name


def test_registered_shadows_entry_point(fake_dist):
    _, path = fake_dist
    reg = R.Registry(path=[str(path)])

    class Replacement(TinyPixels):
        name = "fakeparam"
    with reg.registered("parameterization", Replacement):
        assert reg.get_parameterization("fakeparam") is Replacement
        infos = [i for i in reg.list_plugins("parameterization") if i.name == "fakeparam"]
        assert [i.source for i in infos] == ["registered", "entry_point"]
        assert infos[1].shadowed_by == "registered"
    assert reg.get_parameterization("fakeparam") is not Replacement


def test_builtin_plugins_via_entry_points():
    """pixel and dm are found like any third-party plugin (when installed)."""
    names = R.Registry().names("parameterization")
    if "pixel" not in names:
        pytest.skip("splatdd-pixel not installed")
    assert R.get_parameterization("pixel").name == "pixel"


def test_reject_unknown_options_names_plugin_unknown_and_known():
    from splatdd.plugin_api import reject_unknown_options
    reject_unknown_options("p", {"a": 1}, ("a", "b"))          # all known: no error
    reject_unknown_options("p", [], ())
    with pytest.raises(TypeError) as e:
        reject_unknown_options("myplug", {"zz": 1, "a": 2, "bogus": 3}, ("a", "b"))
    msg = str(e.value)
    assert msg.startswith("myplug: unknown option(s) bogus, zz;")   # sorted, known ones not listed
    assert msg.endswith("known: a, b")
    with pytest.raises(TypeError, match="known: none"):
        reject_unknown_options("p", ["x"], ())


def test_draw_seed_is_torch_randint_from_the_generator():
    """Independent oracle: the same generator state gives torch.randint's value; the range holds."""
    from splatdd.plugin_api import SEED_HIGH, draw_seed
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    seeds = [draw_seed(g1) for _ in range(50)]
    assert seeds == [int(torch.randint(0, SEED_HIGH, (1,), generator=g2)) for _ in range(50)]
    assert all(0 <= s < 2**31 - 1 for s in seeds) and len(set(seeds)) == 50
    assert all(0 <= draw_seed(g1, 3) < 3 for _ in range(20))


def test_learned_eval_lr_only_for_algorithms_of_the_protocol():
    from splatdd.plugin_api import LearnsEvalLR, learned_eval_lr

    class Plain:
        pass

    class Learns:
        def learned_lr(self):
            return torch.tensor(0.25)
    assert learned_eval_lr(Plain()) is None and not isinstance(Plain(), LearnsEvalLR)
    assert isinstance(Learns(), LearnsEvalLR) and learned_eval_lr(Learns()) == 0.25
    assert not hasattr(Algorithm, "learned_lr")


def test_regime_setting_and_check_regime_messages():
    from splatdd.plugin_api import REGIMES, check_regime, regime_setting
    assert REGIMES == ("distribution", "gradient", "trajectory", "recover")
    assert regime_setting({"gradient": 0.1}, "gradient", "p") == 0.1
    with pytest.raises(ValueError, match=r"p: unknown regime 'dc'; it has settings for: gradient"):
        regime_setting({"gradient": 0.1}, "dc", "p")
    with pytest.raises(ValueError, match="p: no optimiser setting for regime 'recover'"):
        regime_setting({"gradient": 0.1}, "recover", "p")
    assert check_regime("recover") == "recover"
    with pytest.raises(ValueError, match="got 'mtt'"):
        check_regime("mtt")


def test_optimizer_spec_betas_reach_adam():
    from splatdd.plugin_api import OptimizerSpec
    x = torch.nn.Parameter(torch.zeros(3))
    opt = OptimizerSpec([{"params": [x], "lr": 0.25}], kind="adam", betas=(0.5, 0.9)).build()
    assert opt.param_groups[0]["betas"] == (0.5, 0.9) and opt.param_groups[0]["lr"] == 0.25
    assert OptimizerSpec([{"params": [x], "lr": 1.0}]).build().param_groups[0]["betas"] == \
        (0.9, 0.999)
    with pytest.raises(ValueError, match="'adam' or 'sgd'"):
        OptimizerSpec([{"params": [x], "lr": 1.0}], kind="rmsprop").build()
