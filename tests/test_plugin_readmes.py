"""Every plugin distribution has a README (its package's ``readme``) that stays true to the code.

Oracles, all taken from the code rather than from the README:

* the README names every option the plugin accepts, and an options table (header
  ``| option | default | ...``) lists exactly those: the accepted options are its ``build`` /
  ``__init__`` keywords, or, where it takes ``**options``, the "known:" list of its
  :func:`splatdd.plugin_api.reject_unknown_options` error for a made-up option;
* every ``splatdd ...`` line in a README's shell blocks parses with the real CLI parser (so renamed
  or removed flags are caught), and its ``--param-opt`` / ``--algo-opt`` keys are options of the
  plugin it names;
* every Python block runs (in this process, one torch thread), and prints what its
  ``print(...)  # expected`` comments say.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import re
import shlex
from pathlib import Path

import pytest
import torch

from splatdd.testing import TINY_SPEC, make_tiny_real, single_thread

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIRS = sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))
GROUPS = {"splatdd.parameterizations": "parameterization", "splatdd.algorithms": "algorithm"}
#: constructor arguments every plugin of a kind takes; not options
FIXED = {"self", "cls", "spec", "ipc", "generator", "real"}
PROBE = "readme_probe_option"


def _project(plugin_dir: Path) -> dict:
    with open(plugin_dir / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _load(value: str):
    module, _, attr = value.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def accepted_options(kind: str, cls) -> set[str]:
    """The options ``cls`` accepts, read from its signature or from its unknown-option error."""
    fn = cls.build if kind == "parameterization" else cls.__init__
    params = inspect.signature(fn).parameters.values()
    named = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - FIXED
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        return named
    with pytest.raises(TypeError, match="known: ") as err:
        if kind == "parameterization":
            cls.build(TINY_SPEC, 1, generator=torch.Generator().manual_seed(0), **{PROBE: 1})
        else:
            cls(make_tiny_real(n_per_class=2), ipc=1, generator=torch.Generator().manual_seed(0),
                **{PROBE: 1})
    assert PROBE in str(err.value)
    known = str(err.value).split("known: ", 1)[1].strip()
    return {k.strip() for k in known.split(",")} if known != "none" else set()


def plugin_options(plugin_dir: Path) -> dict[str, tuple[str, set[str]]]:
    """``{entry-point name: (kind, accepted options)}`` of a distribution's plugins."""
    out = {}
    for group, eps in _project(plugin_dir).get("entry-points", {}).items():
        if group in GROUPS:
            for name, value in eps.items():
                out[name] = (GROUPS[group], accepted_options(GROUPS[group], _load(value)))
    return out


def documented_options(text: str) -> set[str]:
    """Names in the first column of every ``| option | default |`` table (``--flags`` excluded)."""
    names: set[str] = set()
    in_table = False
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells[:2] == ["option", "default"]:
            in_table = True
            continue
        if not cells:
            in_table = False
            continue
        if in_table and not set(cells[0]) <= set("-: "):
            names |= {n for n in re.findall(r"`([^`]+)`", cells[0]) if not n.startswith("-")}
    return names


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def splatdd_commands(text: str) -> list[list[str]]:
    """Every ``splatdd ...`` command of the README's bash blocks, as argv (without ``splatdd``)."""
    out = []
    for block in code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|\|", line):
                argv = shlex.split(part, comments=True)
                if argv[:1] == ["splatdd"]:
                    out.append(argv[1:])
    return out


def _readme(plugin_dir: Path) -> str:
    path = plugin_dir / "README.md"
    assert path.is_file(), f"{plugin_dir.name}: no README.md"
    return path.read_text()


@pytest.fixture(scope="module")
def parser():
    from splatdd.cli import build_parser
    return build_parser()


@pytest.mark.parametrize("plugin_dir", PLUGIN_DIRS, ids=lambda p: p.name)
def test_readme_is_the_distributions_readme(plugin_dir):
    assert _project(plugin_dir).get("readme") == "README.md"
    text = _readme(plugin_dir)
    assert f"# {_project(plugin_dir)['name']}" in text.splitlines()[0]


@pytest.mark.parametrize("plugin_dir", PLUGIN_DIRS, ids=lambda p: p.name)
def test_readme_documents_every_option_and_no_other(plugin_dir):
    """Every accepted option is named (in backticks) in the README; every name in an options table
    is an accepted option (a table lists them all)."""
    text = _readme(plugin_dir)
    plugins = plugin_options(plugin_dir)
    if not plugins:
        pytest.skip(f"{plugin_dir.name} has no parameterization or algorithm")
    accepted = set().union(*(opts for _, opts in plugins.values()))
    named = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", text))
    assert accepted <= named, f"{plugin_dir.name}/README.md does not name {sorted(accepted - named)}"
    tabled = documented_options(text)
    assert tabled <= accepted, f"{plugin_dir.name}/README.md: not options {sorted(tabled - accepted)}"
    assert not tabled or tabled == accepted, \
        f"{plugin_dir.name}/README.md: the options table lacks {sorted(accepted - tabled)}"


@pytest.mark.parametrize("plugin_dir", PLUGIN_DIRS, ids=lambda p: p.name)
def test_readme_commands_parse_and_name_real_options(plugin_dir, parser):
    commands = splatdd_commands(_readme(plugin_dir))
    assert commands, f"{plugin_dir.name}/README.md has no splatdd example"
    known = {}
    for d in PLUGIN_DIRS:
        known.update(plugin_options(d))
    for argv in commands:
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{plugin_dir.name}/README.md: `splatdd {shlex.join(argv)}` does not parse")
        for attr, plugin_attr in (("param_opt", "param"), ("algo_opt", "algo")):
            for item in getattr(args, attr, None) or []:
                name = getattr(args, plugin_attr)
                assert name in known, f"`splatdd {shlex.join(argv)}`: no plugin {name!r}"
                key = item.split("=", 1)[0]
                assert key in known[name][1], f"`splatdd {shlex.join(argv)}`: {name} has no option {key!r}"


@pytest.mark.parametrize("plugin_dir", PLUGIN_DIRS, ids=lambda p: p.name)
def test_readme_python_examples_print_what_they_say(plugin_dir, tmp_path, monkeypatch):
    blocks = code_blocks(_readme(plugin_dir), "python")
    if not blocks:
        pytest.skip(f"{plugin_dir.name}/README.md has no Python example")
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(blocks):
        expected = [m.group(1).strip() for m in re.finditer(r"^\s*print\(.*\)\s*#\s*(.+)$", code, re.M)]
        out = io.StringIO()
        with single_thread(), contextlib.redirect_stdout(out):
            exec(compile(code, f"{plugin_dir.name}/README.md block {i}", "exec"), {"__name__": "__readme__"})
        assert out.getvalue().strip().splitlines() == expected, f"{plugin_dir.name}/README.md block {i}"
