"""Installing from a wheelhouse, as docs/install.md says: `scripts/build_wheels.sh WH` builds splatdd
and every plugin under plugins/*/, then `pip install --find-links WH "splatdd[diffusion]"` (or
`"splatdd[all]"`) into a fresh virtual environment.

The oracle is the checkout itself: the distributions and entry points declared in the plugins'
pyproject.toml files. The fast tests check the extras and the script's refusals; the slow one does
the whole install (it compiles the core's C++ extension into a wheel, about a minute on 2 cores).

The fresh venv sees the already installed torch 2.13.0 (so pip never resolves a new, several-GB
CUDA torch) but not splatdd: ``python -m venv --system-site-packages`` would also expose the
developer's (or CI's) editable splatdd and plugins, and pip would then install nothing. So the venv
is made without system site-packages and without pip, and gets a ``.pth`` line pointing at a folder
of links to every system site-packages entry EXCEPT splatdd's own distributions: torch, diffusers
and pip are visible (and count as installed), splatdd is not. ``--no-index`` keeps it offline.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_wheels.sh"
#: site-packages entries that belong to splatdd's own (editable) distributions
OURS = ("splatdd", "__editable__.splatdd", "_editable_skbc_splatdd", "__editable___splatdd")


def _pyproject(path: Path) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def plugin_projects() -> dict[str, dict]:
    """Every plugin distribution of the checkout: ``{name: [project] table}`` from plugins/*/."""
    out = {}
    for p in sorted((ROOT / "plugins").glob("*/pyproject.toml")):
        project = _pyproject(p)["project"]
        out[project["name"]] = project
    return out


def declared_entry_points(names) -> set[tuple[str, str, str]]:
    """``(plugin name, distribution, entry point value)`` of every splatdd.* entry point declared
    (``"command"`` for the name of a command plugin, listed by the commands it registers) by the core and the plugin distributions ``names``: what ``splatdd plugins`` must list once
    they are installed."""
    projects = {"splatdd": _pyproject(ROOT / "pyproject.toml")["project"], **plugin_projects()}
    return {("command" if group == "splatdd.commands" else ep, dist, value)
            for dist in ["splatdd", *names]
            for group, eps in projects[dist].get("entry-points", {}).items() if group.startswith("splatdd.")
            for ep, value in eps.items()}


def _run(cmd, *, ok=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if ok and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                             f"{r.stderr[-3000:]}")
    return r


def venv_without_splatdd(path: Path) -> Path:
    """A new venv at ``path`` that sees the system's site-packages except splatdd's distributions;
    returns its python. See the module docstring for why not ``--system-site-packages``."""
    _run([sys.executable, "-m", "venv", "--without-pip", path])
    visible = path / "system-site"
    visible.mkdir()
    for sp in site.getsitepackages():
        for entry in Path(sp).iterdir():
            if entry.name.lower().startswith(OURS) or entry.suffix == ".pth" or (visible / entry.name).exists():
                continue
            (visible / entry.name).symlink_to(entry)
    vpy = path / "bin" / "python"
    purelib = _run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(purelib) / "zz_system_site.pth").write_text(str(visible) + "\n")
    return vpy


def _offline_env() -> dict[str, str]:
    env = dict(os.environ, SPLATDD_CUDA="OFF", PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PIP_FIND_LINKS", None)
    return env


# ---- fast: the extras and the script's refusals -------------------------------------------------------
def test_all_extra_lists_exactly_the_plugin_distributions():
    extras = _pyproject(ROOT / "pyproject.toml")["project"]["optional-dependencies"]
    assert sorted(extras["all"]) == sorted(plugin_projects()), \
        "pyproject.toml's `all` extra must list every plugins/*/ distribution (and nothing else)"
    assert set(extras["diffusion"]) <= set(extras["all"])


def test_no_project_lists_torch_as_a_build_requirement():
    for p in [ROOT / "pyproject.toml", *sorted((ROOT / "plugins").glob("*/pyproject.toml"))]:
        reqs = _pyproject(p)["build-system"]["requires"]
        assert not [r for r in reqs if r.lower().replace("_", "-").startswith("torch")], p


def _fake_checkout(tmp_path: Path, build_requires: list[str]) -> Path:
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "scripts" / "build_wheels.sh")
    (root / "pyproject.toml").write_text(
        f"[build-system]\nrequires = {json.dumps(build_requires)}\nbuild-backend = 'x'\n"
        "[project]\nname = 'splatdd'\nversion = '0'\n")
    return root / "scripts" / "build_wheels.sh"


def test_build_wheels_refuses_torch_as_build_requirement(tmp_path):
    script = _fake_checkout(tmp_path, ["setuptools>=61", "torch>=2.1"])
    r = _run(["bash", script, tmp_path / "wh"], ok=False, env=dict(_offline_env(), SPLATDD_SKIP_BUILD_DEPS="1"))
    assert r.returncode == 2
    assert "torch must not be a build requirement" in r.stderr and "pyproject.toml" in r.stderr
    assert not (tmp_path / "wh").exists()


def test_build_wheels_names_the_missing_build_requirements(tmp_path):
    script = _fake_checkout(tmp_path, ["setuptools>=61", "splatdd-no-such-backend>=1", "pip>=999"])
    r = _run(["bash", script, tmp_path / "wh"], ok=False, env=dict(_offline_env(), SPLATDD_SKIP_BUILD_DEPS="1"))
    assert r.returncode == 2, r.stderr
    assert "splatdd-no-such-backend>=1 (not installed)" in r.stderr
    assert "pip>=999 (installed:" in r.stderr
    assert "setuptools" not in r.stderr.split("missing build requirements")[1]  # it is installed
    assert not (tmp_path / "wh").exists()


# ---- slow: the whole wheelhouse install --------------------------------------------------------------
@pytest.mark.slow
def test_install_from_wheelhouse_diffusion_then_all(tmp_path):
    if shutil.which("cmake") is None:
        pytest.fail("cmake is needed to build the core wheel (apt-get install cmake)")
    env = _offline_env()
    wh = tmp_path / "wheelhouse"
    # 1. the documented build: every project under plugins/ gets a wheel
    r = _run(["bash", SCRIPT, wh], env=dict(env, SPLATDD_BUILD_DIR=str(tmp_path / "build")), cwd=tmp_path)
    built = sorted(p.name.split("-")[0].replace("_", "-") for p in wh.glob("*.whl"))
    assert built == sorted(["splatdd", *plugin_projects()]), r.stdout

    # 2. a fresh venv: torch visible, splatdd not
    vpy = venv_without_splatdd(tmp_path / "venv")
    torch_version = __import__("torch").__version__
    r = _run([vpy, "-c", "import importlib.util as u, torch; print(torch.__version__, u.find_spec('splatdd') is None)"],
             env=env)
    assert r.stdout.split() == [torch_version, "True"]
    splatdd_cli = tmp_path / "venv" / "bin" / "splatdd"

    def installed_plugins() -> set[tuple[str, str, str]]:
        r = _run([splatdd_cli, "plugins", "--json", "--strict"], env=env, cwd=tmp_path)
        rows = json.loads(r.stdout)
        bad = [row for row in rows if row["status"] != "ok"]
        assert not bad, bad
        # command plugins are listed by the command names they register (train-ldm, ...), not
        # by their entry point's name: compare those by distribution and value
        return {("command" if row["kind"] == "command" else row["name"], row["distribution"],
                 row["value"]) for row in rows}

    # 3. splatdd[diffusion]: the core and the ld3m plugin, from the wheels; torch untouched
    pip = [vpy, "-m", "pip", "install", "--no-index", "--find-links", wh]
    r = _run([*pip, "splatdd[diffusion]"], env=env)
    new = r.stdout.split("Successfully installed")[-1].split()
    assert sorted(n.rsplit("-", 1)[0] for n in new) == ["splatdd", "splatdd-ld3m"], r.stdout
    assert installed_plugins() == declared_entry_points(["splatdd-ld3m"])
    code = ("import torch, splatdd, splatdd_ld3m\n"
            "print(torch.__version__, splatdd.__file__, splatdd_ld3m.__file__)\n")
    tv, core_file, ld3m_file = _run([vpy, "-c", code], env=env, cwd=tmp_path).stdout.split()
    assert tv == torch_version
    assert core_file.startswith(str(tmp_path / "venv")) and ld3m_file.startswith(str(tmp_path / "venv"))
    r = _run([splatdd_cli, "convert-ldm", "--help"], env=env, cwd=tmp_path)
    assert "CompVis" in r.stdout

    # 4. splatdd[all]: every plugin distribution of the checkout, every entry point loads
    r = _run([*pip, "splatdd[all]"], env=env)
    assert "torch" not in r.stdout.split("Successfully installed")[-1]
    assert installed_plugins() == declared_entry_points(plugin_projects())
