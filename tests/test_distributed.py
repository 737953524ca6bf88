"""Multi-process runs started with torch's own launcher (torchrun, gloo on the CPU) against the
single-process run as the oracle: same parameters after a few steps, a killed rank stops the job,
a killed job resumes and finishes."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from splatdd import distributed
from splatdd.testing import default_sigint

pytest.importorskip("splatdd_pixel")
pytest.importorskip("splatdd_dm")
pytestmark = pytest.mark.slow


def _env(fmnist_root):
    # PYTHONFAULTHANDLER: a rank that aborts in native code (SIGABRT, SIGSEGV) prints every
    # thread's Python stack, so a failure here says where that rank was
    return {**os.environ, "SPLATDD_FASHION_MNIST": str(fmnist_root), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "SPLATDD_DIST_TIMEOUT": "30", "PYTHONFAULTHANDLER": "1"}


def _distill(args, fmnist_root, cwd, nproc=None, **kw):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", "-m", "splatdd"] if nproc
                else [sys.executable, "-m", "splatdd"])
    return subprocess.Popen([*launcher, "distill", *args], env=_env(fmnist_root), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint, **kw)


def _tensors(path):
    from safetensors.torch import load_file
    return load_file(path)


TINY = ["--algo", "dm", "--ipc", "1", "--algo-opt", "batch_real=4", "--algo-opt", "net_width=8",
        "--eval-runs", "0", "--no-progress", "--threads", "1"]


def test_two_processes_match_one(fmnist_root, tmp_path):
    """gaussian: its boundary regularisation must count once however many ranks add losses."""
    pytest.importorskip("splatdd_gaussian")
    param = "gaussian"
    extra = ["--param", param, "--iterations", "3"] + (
        ["--param-opt", "gpc=2", "--init-steps", "3"] if param == "gaussian" else [])
    one = _distill([*TINY, *extra, "--out", str(tmp_path / "one")], fmnist_root, tmp_path)
    out1, err1 = one.communicate(timeout=600)
    assert one.returncode == 0, err1
    two = _distill([*TINY, *extra, "--out", str(tmp_path / "two")], fmnist_root, tmp_path, nproc=2)
    out2, err2 = two.communicate(timeout=600)
    assert two.returncode == 0, err2
    assert "2 processes, backend gloo" in out2
    a, b = _tensors(tmp_path / "one/distilled.safetensors"), _tensors(
        tmp_path / "two/distilled.safetensors")
    init = _tensors(tmp_path / "one/initial.safetensors")
    for k in a:
        # fp32, summation order differs: within 1e-5 relative of the values' scale
        scale = a[k].float().abs().max().item()
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5 * scale, rtol=0), k
        if a[k].is_floating_point():
            assert not torch.equal(a[k], init[k]), k      # the steps did move the tensors
    h1 = (tmp_path / "one/history.json").read_text()
    assert (tmp_path / "two/history.json").is_file() and h1


def _same_tensors(one, two, moved_from=None, rel=1e-5):
    """``one`` and ``two`` (safetensors files) hold the same tensors within ``rel`` of each
    tensor's scale; with ``moved_from``, every float tensor differs from that file's (it trained)."""
    a, b = _tensors(one), _tensors(two)
    assert a.keys() == b.keys()
    init = _tensors(moved_from) if moved_from is not None else {}
    for k in a:
        scale = a[k].float().abs().max().item()
        assert torch.allclose(a[k].float(), b[k].float(), atol=rel * scale, rtol=0), k
        if k in init and a[k].is_floating_point():
            assert not torch.equal(a[k], init[k]), k


def test_dc_two_processes_match_one(fmnist_root, tmp_path):
    """dc: classes split over 2 ranks, gradients summed, the inner network trained identically on
    both ranks (outer_loop 3: the network of steps 1-3 is trained twice in between); the same
    parameters as 1 process within 1e-5 of their scale (fp32). run()'s evaluation (before and
    after, 3 nets spread over the 2 ranks) reports the 1-process accuracies."""
    import json
    pytest.importorskip("splatdd_dc")
    args = ["--param", "pixel", "--algo", "dc", "--ipc", "1", "--iterations", "4",
            "--algo-opt", "batch_real=4", "--algo-opt", "net_width=8",
            "--algo-opt", "outer_loop=3", "--algo-opt", "inner_loop=2",
            "--eval-runs", "3", "--eval-epochs", "2", "--eval-before",
            "--no-progress", "--threads", "1"]
    one = _distill([*args, "--out", str(tmp_path / "one")], fmnist_root, tmp_path)
    out1, err1 = one.communicate(timeout=600)
    assert one.returncode == 0, err1
    two = _distill([*args, "--out", str(tmp_path / "two")], fmnist_root, tmp_path, nproc=2)
    out2, err2 = two.communicate(timeout=600)
    assert two.returncode == 0, err2
    assert "2 processes, backend gloo" in out2
    _same_tensors(tmp_path / "one/distilled.safetensors", tmp_path / "two/distilled.safetensors",
                  moved_from=tmp_path / "one/initial.safetensors")
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    for when in ("before", "after"):
        assert len(r1[when][0]["accs"]) == 3
        assert r2[when][0]["accs"] == pytest.approx(r1[when][0]["accs"], abs=1e-9), when


def _splatdd(args, fmnist_root, cwd, nproc=None, **kw):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", "-m", "splatdd"] if nproc
                else [sys.executable, "-m", "splatdd"])
    return subprocess.run([*launcher, *args], env=_env(fmnist_root), cwd=cwd, capture_output=True,
                          text=True, timeout=600, **kw)


def _distilled_file(fmnist_root, path, monkeypatch):
    """A pixel set initialised from real images of the tiny FashionMNIST, saved as a distilled
    file."""
    from splatdd import distilled_file
    from splatdd.data import load_dataset
    from splatdd.initialise import init_from_real
    from splatdd.registry import default_registry
    monkeypatch.setenv("SPLATDD_FASHION_MNIST", str(fmnist_root))
    train, _ = load_dataset("fashion_mnist", progress=False)
    gen = torch.Generator().manual_seed(0)
    param = default_registry().get("parameterization", "pixel").build(train.spec, 1,
                                                                      generator=gen)
    init_from_real(param, train, gen)
    distilled_file.save(path, param, spec=train.spec, ipc=1)
    return path


def test_eval_four_nets_on_two_ranks_match_one(fmnist_root, tmp_path, monkeypatch):
    import json
    f = _distilled_file(fmnist_root, tmp_path / "set.safetensors", monkeypatch)
    args = ["eval", str(f), "--runs", "4", "--epochs", "3", "--data-root", str(fmnist_root),
            "--no-progress"]
    one = _splatdd([*args, "--json", str(tmp_path / "one.json")], fmnist_root, tmp_path)
    assert one.returncode == 0, one.stderr
    two = _splatdd([*args, "--json", str(tmp_path / "two.json")], fmnist_root, tmp_path, nproc=2)
    assert two.returncode == 0, two.stderr
    a = json.loads((tmp_path / "one.json").read_text())["rows"][0]
    b = json.loads((tmp_path / "two.json").read_text())["rows"][0]
    assert len(a["accs"]) == 4 and len(set(a["accs"])) > 1      # the 4 nets differ
    assert b["accs"] == a["accs"] and b["mean"] == a["mean"]
    assert two.stdout.count("test accuracy") == 1               # rank 0 alone reports


def test_evaluate_trains_only_its_ranks_nets(monkeypatch):
    """Rank 1 of 2 trains runs 1 and 3 with the seeds one process gives them, and returns every
    run's accuracy in run order (rank 0's part comes from the gather)."""
    from splatdd import evaluate as ev
    from splatdd.testing import make_tiny_real
    seeds = []
    monkeypatch.setattr(ev, "train_network", lambda net, *a, seed, **k: seeds.append(seed))
    monkeypatch.setattr(ev, "test_accuracy", lambda net, test, **k: float(seeds[-1] % 97))
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "wait_for_all", lambda: None)
    rank0 = {0: (11.0, 1.0, 0.5), 2: (12.0, 1.0, 0.5)}
    monkeypatch.setattr(distributed, "gather", lambda obj: [rank0, obj])
    real = make_tiny_real()
    res = ev.evaluate(real.images[:10], real.labels[:10], real, runs=4, epochs=1, seed=5,
                      progress=False)
    assert seeds == [ev.run_seed(5, 1), ev.run_seed(5, 3)]
    assert res.accs == [11.0, ev.run_seed(5, 1) % 97, 12.0, ev.run_seed(5, 3) % 97]
    assert res.train_seconds >= 2.0


BUFFER = ["buffer", "--dataset", "fashion_mnist", "--net-width", "8", "--batch", "64",
          "--no-progress", "--threads", "1"]


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".")}


def test_buffer_experts_spread_over_two_ranks(fmnist_root, tmp_path):
    """3 experts on 2 ranks (rank 0 trains experts 0 and 2, rank 1 expert 1): each rank writes its
    own experts, and the files are the bytes one process writes."""
    pytest.importorskip("splatdd_tm")
    args = [*BUFFER, "--experts", "3", "--epochs", "2", "--data-root", str(fmnist_root)]
    one = _splatdd([*args, "--out", str(tmp_path / "one")], fmnist_root, tmp_path)
    assert one.returncode == 0, one.stderr
    two = _splatdd([*args, "--out", str(tmp_path / "two")], fmnist_root, tmp_path, nproc=2)
    assert two.returncode == 0, two.stderr
    assert "spread over 2 processes" in two.stdout
    for rank, expert in ((0, 0), (1, 1), (0, 2)):
        assert f"[rank {rank}] expert {expert}: train loss" in two.stdout, two.stdout
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    assert len(_files(tmp_path / "one")) == 4                   # buffer.json + 3 experts


def test_buffer_ctrl_c_keeps_the_expert_in_progress(fmnist_root, tmp_path):
    """SIGINT to `splatdd buffer` (as Ctrl-C): exit 130, a message and no traceback, the epochs
    of the expert in progress on disk as the message says; the same command then finishes with
    the bytes of an uninterrupted run."""
    import re

    from splatdd_tm.buffer import partial_path
    args = [*BUFFER, "--experts", "1", "--epochs", "30", "--no-eval",
            "--data-root", str(fmnist_root)]
    full = _splatdd([*args, "--out", str(tmp_path / "full")], fmnist_root, tmp_path)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "part"
    job = subprocess.Popen([sys.executable, "-m", "splatdd", *args, "--out", str(out)],
                           env=_env(fmnist_root), cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while not partial_path(out, 0).exists():                   # expert 0 has an epoch saved
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130, err
    assert "Traceback" not in err and "run the same command again to resume" in err, err
    m = re.search(r"expert (\d) has (\d+) of 30 epochs saved in (\S+\.partial\.pt)", err)
    assert m, err
    saved = torch.load(m.group(3), weights_only=True)
    assert m.group(3) == str(partial_path(out, int(m.group(1))))
    assert saved["epochs_done"] == int(m.group(2)) and 0 < saved["epochs_done"] < 30
    again = _splatdd([*args, "--out", str(out)], fmnist_root, tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"expert {m.group(1)}: continuing after epoch {m.group(2)}" in again.stdout
    assert _files(out) == _files(tmp_path / "full")


def _torchrun_script(tmp_path, fmnist_root, body, timeout_s="2"):
    script = tmp_path / "script.py"
    script.write_text(body)
    env = {**_env(fmnist_root), "SPLATDD_DIST_TIMEOUT": timeout_s}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_wait_for_all_outlasts_the_collective_timeout(tmp_path, fmnist_root):
    """Uneven work: rank 0 is busy 3x longer than the collective timeout; wait_for_all lets rank 1
    wait (a plain gather would fail), then the gather returns both ranks' parts."""
    r = _torchrun_script(tmp_path, fmnist_root,
                         "import os, time\n"
                         "from splatdd import distributed\n"
                         "ctx = distributed.init_from_env('cpu')\n"
                         "if ctx.rank == 0:\n"
                         "    time.sleep(6)\n"
                         "distributed.wait_for_all()\n"
                         "line = f'gathered {distributed.gather(ctx.rank)}\\n'\n"
                         "os.write(1, line.encode())   # one write per rank: no interleaving\n"
                         "distributed.shutdown()\n")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("gathered [0, 1]") == 2, r.stdout


def test_shutdown_waits_for_a_slow_rank(tmp_path, fmnist_root):
    """Rank 0 still works (writes files) 3x longer than the collective timeout after the last
    collective; rank 1's shutdown waits for it instead of leaving (a collective would time
    out), and both leave only after rank 0 finished."""
    r = _torchrun_script(tmp_path, fmnist_root,
                         "import os, time\n"
                         "from splatdd import distributed\n"
                         "ctx = distributed.init_from_env('cpu')\n"
                         "distributed.broadcast_object('last collective')\n"
                         "if ctx.rank == 0:\n"
                         "    time.sleep(6)\n"
                         "    os.write(1, b'rank 0 finished\\n')\n"
                         "distributed.shutdown()\n"
                         "os.write(1, f'rank {ctx.rank} left\\n'.encode())\n")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert sorted(lines) == ["rank 0 finished", "rank 0 left", "rank 1 left"], r.stdout
    assert lines.index("rank 0 finished") < lines.index("rank 1 left"), r.stdout


def test_a_failed_rank_does_not_leave_the_others_waiting(tmp_path, fmnist_root):
    """Rank 1 fails after the last collective; rank 0's synchronised shutdown would wait for it
    for a day, but torchrun sees the failure and ends the job at once, non-zero."""
    t0 = time.monotonic()
    r = _torchrun_script(tmp_path, fmnist_root,
                         "import time\n"
                         "from splatdd import distributed\n"
                         "ctx = distributed.init_from_env('cpu')\n"
                         "distributed.broadcast_object('last collective')\n"
                         "if ctx.rank == 1:\n"
                         "    distributed.shutdown(sync=False)\n"
                         "    raise SystemExit('rank 1 failed')\n"
                         "distributed.shutdown()\n")
    assert r.returncode != 0
    assert "rank 1 failed" in r.stderr
    assert time.monotonic() - t0 < 90


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def test_killing_one_rank_stops_the_job(fmnist_root, tmp_path):
    job = _distill([*TINY, "--param", "pixel", "--iterations", "100000", "--checkpoint-every", "2",
                    "--out", str(tmp_path / "run")], fmnist_root, tmp_path, nproc=2,
                   start_new_session=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "run" / "checkpoint.pt").exists():       # both ranks are stepping
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    workers = _children(job.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    t0 = time.monotonic()
    try:
        job.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        pytest.fail("the job did not stop within 60 s of a rank's death")
    assert job.returncode != 0
    assert time.monotonic() - t0 < 60
    # the whole job was killed mid-run: the same command plus --resume finishes it
    step = torch.load(tmp_path / "run/checkpoint.pt", weights_only=False)["step"]
    again = _distill([*TINY, "--param", "pixel", "--iterations", str(step + 2), "--resume",
                      "--out", str(tmp_path / "run")], fmnist_root, tmp_path, nproc=2)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert torch.load(tmp_path / "run/checkpoint.pt", weights_only=False)["step"] == step + 2


def test_single_process_helpers_are_identities():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.owned(range(5)) == [0, 1, 2, 3, 4]
    assert distributed.gather("x") == ["x"] and distributed.all_reduce_sum(2.5) == 2.5
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert distributed.reduce_gradients([p]) == 0 and torch.equal(p.grad, torch.full((3,), 2.0))
    a = distributed.item_generator(7, 3)
    b = distributed.item_generator(7, 3)
    c = distributed.item_generator(7, 4)
    x, y, z = (torch.randint(0, 2**30, (4,), generator=g) for g in (a, b, c))
    assert torch.equal(x, y) and not torch.equal(x, z)
    with pytest.raises(ValueError, match="op must be one of"):
        distributed.reduce_gradients([p], op="max")


def test_tm_two_ranks_average_their_segment_losses(fmnist_root, tmp_path, monkeypatch):
    """The 2-process loss of step 1 is the mean of what rank 0 and rank 1 compute alone (each
    rank's segment reproduced in one process by giving the algorithm that rank)."""
    tm_buffer = pytest.importorskip("splatdd_tm.buffer")
    import json

    from splatdd.data import load_dataset
    from splatdd.experiment import ExperimentConfig
    from splatdd.initialise import init_from_real
    from splatdd.registry import default_registry
    monkeypatch.setenv("SPLATDD_FASHION_MNIST", str(fmnist_root))
    train, _ = load_dataset("fashion_mnist", progress=False)
    buf = tmp_path / "buffer"
    tm_buffer.train_experts(train, buf, experts=2, epochs=3, net_width=8, batch_size=16,
                            progress=False)
    opts = ["--algo-opt", f"buffer_dir={buf}", "--algo-opt", "syn_steps=2",
            "--algo-opt", "expert_epochs=1", "--algo-opt", "max_start_epoch=2",
            "--algo-opt", "batch_syn=5"]
    args = ["--param", "pixel", "--algo", "tm", "--ipc", "1", "--iterations", "1",
            "--eval-runs", "0", "--no-progress", "--threads", "1", *opts]
    two = _distill([*args, "--out", str(tmp_path / "two")], fmnist_root, tmp_path, nproc=2)
    out, err = two.communicate(timeout=600)
    assert two.returncode == 0, err
    loss2 = json.loads((tmp_path / "two/history.json").read_text())["losses"][0]

    cfg = ExperimentConfig(parameterization="pixel", algorithm="tm", ipc=1)
    reg = default_registry()
    losses = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        gen = torch.Generator().manual_seed(cfg.seed)
        param = reg.get("parameterization", "pixel").build(train.spec, 1, generator=gen)
        init_from_real(param, train, gen)
        algo = reg.get("algorithm", "tm")(train, ipc=1, generator=torch.Generator().manual_seed(0),
                                          buffer_dir=str(buf), syn_steps=2, expert_epochs=1,
                                          max_start_epoch=2, batch_syn=5)
        losses.append(float(algo.loss(param, 0).detach()))
    assert losses[0] != losses[1]                      # the ranks unrolled different segments
    assert loss2 == pytest.approx(sum(losses) / 2, rel=1e-5)
