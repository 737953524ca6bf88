"""End-to-end CLI: a tiny FashionMNIST run (distill, resume, eval, render, export), plugin
listing, plugin commands and clear errors for bad arguments."""
import json

import pytest
import torch

from splatdd import cli
from splatdd.registry import Registry

pytest.importorskip("splatdd_pixel")
pytest.importorskip("splatdd_dm")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def env(fmnist_root, monkeypatch):
    monkeypatch.setenv("SPLATDD_FASHION_MNIST", str(fmnist_root))


TINY = ["--algo-opt", "batch_real=8", "--algo-opt", "net_width=8", "--eval-runs", "1",
        "--eval-epochs", "2", "--no-progress", "--checkpoint-every", "1"]


def test_distill_resume_eval_render_export(env, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["distill", "--dataset", "fashion_mnist", "--param", "pixel", "--algo", "dm",
                   "--ipc", "1", "--iterations", "2", "--out", str(out), *TINY])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "ConvNet: test accuracy" in text and "+-" in text and "protocol paper" in text
    res = json.loads((out / "results.json").read_text())
    row, = res["after"]
    assert res["iterations"] == 2 and row["runs"] == 1 and len(row["accs"]) == 1
    assert row["protocol"] == "paper" and row["settings"]["epochs"] == 2
    assert res["config"]["algo_options"] == {"batch_real": 8, "net_width": 8}
    for name in ("distilled.safetensors", "checkpoint.pt", "loss.png", "history.json"):
        assert (out / name).is_file()

    # a used run folder needs --resume (or --overwrite)
    assert cli.main(["distill", "--ipc", "1", "--iterations", "3", "--out", str(out), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    # resume continues to 3 iterations, without evaluation
    rc = cli.main(["distill", "--ipc", "1", "--iterations", "3", "--out", str(out), "--resume",
                   *TINY, "--eval-runs", "0"])
    assert rc == 0
    hist = json.loads((out / "history.json").read_text())
    assert len(hist["losses"]) == 3
    capsys.readouterr()

    f = str(out / "distilled.safetensors")
    assert cli.main(["eval", f, "--runs", "1", "--epochs", "1", "--no-progress",
                     "--json", str(tmp_path / "e.json")]) == 0
    assert "ConvNet: test accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["rows"][0]["lr"] == 0.01
    assert cli.main(["render", f, "--out", str(tmp_path / "g.png"), "--resolution", "56",
                     "--bare"]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size == (10 * 58 + 2, 58 + 2)
    assert cli.main(["export", f, "--out", str(tmp_path / "x.pt")]) == 0
    obj = torch.load(tmp_path / "x.pt")
    assert obj["images"].shape == (10, 1, 28, 28) and obj["labels"].tolist() == list(range(10))


def test_plugins_command(capsys):
    assert cli.main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "pixel" in text and "splatdd-pixel" in text and "dm" in text
    assert cli.main(["plugins", "--json", "--no-load"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["name"] == "pixel" and r["kind"] == "parameterization" for r in rows)


@pytest.mark.parametrize("argv,needle", [
    (["distill", "--ipc", "1", "--param", "nope"], "no parameterization plugin named 'nope'"),
    (["distill", "--ipc", "1", "--algo", "nope"], "no algorithm plugin named 'nope'"),
    (["distill", "--ipc", "1", "--param-opt", "novalue"], "key=value"),
    (["distill", "--ipc", "1", "--param-opt", "gpc=3", "--iterations", "1"], "gpc"),
    (["distill", "--ipc", "1", "--algo-opt", "bogus=1", "--iterations", "1"], "bogus"),
    (["distill", "--ipc", "1", "--dataset", "nodata", "--iterations", "1"], "nodata"),
    (["eval", "/nonexistent/file.safetensors"], "no such file"),
    (["distill", "--ipc", "1", "--device", "cuda:0"], "CUDA"),
    (["distill"], "--ipc is required without --config"),
    (["distill", "--config", "no-such-preset"], "no preset named 'no-such-preset'"),
    (["distill", "--config", "fmnist-main", "--set", "eval.runz=1"], "unknown key(s) runz"),
    (["distill", "--config", "fmnist-main", "--set", "ipc=0"], "ipc must be an integer >= 1"),
    (["distill", "--ipc", "1", "--eval-protocol", "nope"], "no protocol plugin named 'nope'"),
    (["distill", "--ipc", "1", "--threads", "100000"], "threads must be between 1 and"),
    (["eval", "/nonexistent/file.safetensors", "--protocol", "nope"], "no protocol plugin"),
    (["eval", "/nonexistent/file.safetensors", "--protocol-opt", "bogus=1"], "bogus"),
])
def test_clear_errors(env, tmp_path, capsys, argv, needle):
    if "cuda" in needle.lower() and torch.cuda.is_available():
        pytest.skip("has CUDA")
    rc = cli.main([*argv, "--out", str(tmp_path / "o")] if argv[0] == "distill" else argv)
    assert rc == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("argv,needles", [
    (["distill", "--ipc", "0"], ["--ipc", "expected a positive integer, got '0'"]),
    (["distill", "--ipc", "x"], ["--ipc", "expected a positive integer, got 'x'"]),
    (["distill", "--ipc", "1", "--lr", "-1"], ["--lr", "expected a positive number, got '-1'"]),
    (["distill", "--ipc", "1", "--lr", "nan"], ["--lr", "expected a positive number, got 'nan'"]),
    (["render", "f"], ["--out"])])
def test_argparse_errors(argv, needles, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err


def test_corrupt_file_error(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00")
    assert cli.main(["render", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "invalid distilled file" in capsys.readouterr().err


def test_plugin_commands_are_added(monkeypatch, capsys):
    reg = Registry(entry_points=False)

    def register(subparsers):
        sp = subparsers.add_parser("hello", help="say hello")
        sp.add_argument("--who", default="world")
        sp.set_defaults(func=lambda a: print(f"hello {a.who}") or 0)

    def broken(subparsers):
        raise RuntimeError("boom")
    reg.register("command", register, name="hello")
    reg.register("command", broken, name="broken")
    monkeypatch.setattr(cli, "_registry", lambda: reg)
    assert cli.main(["hello", "--who", "splat"]) == 0
    cap = capsys.readouterr()
    assert "hello splat" in cap.out
    assert "broken" in cap.err and "boom" in cap.err      # reported, does not stop the CLI


def test_parse_kv():
    assert cli.parse_kv(["a=1", "b=0.5", "c=true", "d=x y", "e=[1,2]", "f-g=None"], "--x") == {
        "a": 1, "b": 0.5, "c": True, "d": "x y", "e": [1, 2], "f_g": None}
