"""Evaluation protocol: learns a separable toy problem, is deterministic, follows the schedule."""
from __future__ import annotations

import pytest
import torch

import splatdd.evaluate as E
from splatdd.evaluate import EvalResult, evaluate, test_accuracy, train_and_test
from splatdd.models import get_network
from splatdd.plugin_api import DatasetSpec, RealData

SPEC = DatasetSpec(name="toy", channels=1, height=16, width=16, num_classes=2)
SMALL = dict(width=16)          # keep the ConvNet tiny: these tests must be fast


def _toy(n_per_class: int, seed: int, noise: float = 0.3):
    """Class 0: bright top half; class 1: bright bottom half (survives DSA's ops)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((2 * n_per_class, 1, 16, 16), -1.0)
    x[:n_per_class, :, :8] = 1.0
    x[n_per_class:, :, 8:] = 1.0
    x += noise * torch.randn(x.shape, generator=g)
    y = torch.arange(2).repeat_interleave(n_per_class)
    return x, y


pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


@pytest.fixture(scope="module")
def toy_test():
    x, y = _toy(50, seed=1)
    return RealData(spec=SPEC, images=x, labels=y)


def test_learns_separable_problem(toy_test):
    x, y = _toy(2, seed=0)
    res = evaluate(x, y, toy_test, runs=2, epochs=30, lr=0.05, seed=0, progress=False, **SMALL)
    assert isinstance(res, EvalResult)
    assert len(res.accs) == 2 and res.mean >= 90.0, res
    assert res.train_seconds > 0 and res.test_seconds >= 0


def test_zero_epochs_and_std_is_population(toy_test):
    x, y = _toy(2, seed=0)
    res = evaluate(x, y, toy_test, runs=3, epochs=0, seed=0, progress=False, **SMALL)
    assert 0 <= res.mean <= 100
    t = torch.tensor(res.accs, dtype=torch.float64)
    assert res.mean == pytest.approx(float(t.mean()))
    assert res.std == pytest.approx(float(t.std(unbiased=False)))


def test_deterministic_in_seed(toy_test):
    x, y = _toy(3, seed=2, noise=1.5)                     # noisy enough that seeds matter
    kw = dict(runs=2, epochs=6, lr=0.01, batch_size=4, progress=False, **SMALL)
    state = torch.get_rng_state()
    a = evaluate(x, y, toy_test, seed=5, **kw)
    b = evaluate(x, y, toy_test, seed=5, **kw)
    assert torch.equal(torch.get_rng_state(), state)      # no global RNG use
    assert a.accs == b.accs
    # and the trained weights really are identical, not just the accuracies
    nets = []
    for _ in range(2):
        net = get_network("ConvNet", 1, 2, 16, seed=9, **SMALL)
        E.train_network(net, x, y, epochs=4, lr=0.01, batch_size=4, seed=3)
        nets.append(net)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q)
    net = get_network("ConvNet", 1, 2, 16, seed=9, **SMALL)
    E.train_network(net, x, y, epochs=4, lr=0.01, batch_size=4, seed=4)
    assert any(not torch.equal(p, q) for p, q in zip(nets[0].parameters(), net.parameters()))


def test_schedule_batches_and_dsa_seeds(toy_test, monkeypatch):
    """SGD(momentum .9, wd 5e-4) at lr, rebuilt at lr/10 at epochs//2; ceil(n/bs) steps per
    epoch; DSA on every batch with a fresh per-step seed, per-sample parameters."""
    made, seeds = [], []
    real_sgd, real_dsa = torch.optim.SGD, E.dsa_fn

    def sgd(params, **kw):
        made.append(kw)
        return real_sgd(params, **kw)

    def rec_dsa(x, strategy, *, seed, params, per_sample):
        seeds.append((seed, x.shape[0], per_sample, strategy))
        return real_dsa(x, strategy, seed=seed, params=params, per_sample=per_sample)

    monkeypatch.setattr(E.torch.optim, "SGD", sgd)
    monkeypatch.setattr(E, "dsa_fn", rec_dsa)
    x, y = _toy(5, seed=0)                                 # 10 images, batch 4 -> 3 steps/epoch
    net = get_network("ConvNet", 1, 2, 16, seed=0, **SMALL)
    acc = train_and_test(net, x, y, toy_test, epochs=4, lr=0.02, batch_size=4, seed=1,
                         dsa_strategy="crop_flip")
    assert 0 <= acc <= 100
    assert [m["lr"] for m in made] == [0.02, pytest.approx(0.002)]
    assert all(m["momentum"] == 0.9 and m["weight_decay"] == 5e-4 for m in made)
    assert len(seeds) == 12 and sorted(s[1] for s in seeds[:3]) == [2, 4, 4]
    assert len({s[0] for s in seeds}) == 12
    assert all(s[2] is True and s[3] == "crop_flip" for s in seeds)
    seeds.clear()
    E.train_network(net, x, y, epochs=2, lr=0.02, dsa=False)
    assert seeds == []


def test_learned_lr_is_used(toy_test):
    x, y = _toy(2, seed=0)
    kw = dict(runs=1, epochs=3, seed=0, progress=False, **SMALL)
    a = evaluate(x, y, toy_test, lr=torch.tensor(0.05).item(), **kw)
    assert a.lr == pytest.approx(0.05)
    with pytest.raises(ValueError):
        evaluate(x, y, toy_test, lr=float("nan"), **kw)


def test_test_accuracy_batched(toy_test):
    class Const(torch.nn.Module):
        def forward(self, x):                             # always predicts class 1
            return torch.tensor([[0.0, 1.0]]).expand(x.shape[0], 2)

    assert test_accuracy(Const(), toy_test, batch_size=7) == 50.0


def test_input_checks(toy_test):
    x, y = _toy(2, seed=0)
    with pytest.raises(ValueError, match="resolution"):
        evaluate(torch.zeros(4, 1, 8, 8), y, toy_test, epochs=1, runs=1, progress=False)
    with pytest.raises(ValueError, match="labels"):
        evaluate(x, y[:3], toy_test, epochs=1, runs=1, progress=False, **SMALL)


def test_progress_bar_runs(toy_test, capsys):
    x, y = _toy(1, seed=0)
    evaluate(x, y, toy_test, runs=1, epochs=2, progress=True, **SMALL)
    assert "eval ConvNet" in capsys.readouterr().err


# ---- chunked passes (issue 15): same maths as one pass per batch --------------------------------
def test_chunked_training_matches_one_pass():
    """Accumulating the batch-mean gradient over passes of ``chunk`` images trains the same net
    (float rounding only) as one pass per batch, the pre-chunking code path."""
    x, y = _toy(7, seed=3, noise=1.0)                      # 14 images, batch 10 -> 10 + 4
    nets = {}
    for chunk in (None, 3, 1):
        net = get_network("ConvNet", 1, 2, 16, seed=4, **SMALL)
        E.train_network(net, x, y, epochs=3, lr=0.05, batch_size=10, seed=2, chunk=chunk)
        nets[chunk] = net
    moved = [float((p - q).detach().abs().max()) for p, q in
             zip(nets[None].parameters(), get_network("ConvNet", 1, 2, 16, seed=4,
                                                      **SMALL).parameters())]
    assert max(moved) > 1e-3                               # training really changed the weights
    for chunk in (3, 1):
        for p, q in zip(nets[None].parameters(), nets[chunk].parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_default_chunk_and_batch_norm():
    cpu = torch.device("cpu")
    inorm = get_network("ConvNet", 1, 2, 16, **SMALL)
    bnorm = get_network("ConvNet", 1, 2, 16, norm="batchnorm", **SMALL)
    assert E.default_chunk(inorm, cpu, training=True) == E.CPU_TRAIN_CHUNK
    assert E.default_chunk(inorm, cpu, training=False) == E.CPU_TEST_CHUNK
    assert E.default_chunk(bnorm, cpu, training=True) is None     # batch statistics: one pass
    assert E.default_chunk(bnorm, cpu, training=False) == E.CPU_TEST_CHUNK  # eval: running stats
    assert E.default_chunk(inorm, torch.device("meta"), training=True) is None
    x, y = _toy(3, seed=0)
    E.train_network(bnorm, x, y, epochs=1, seed=0)          # auto: no chunking, runs
    with pytest.raises(ValueError, match="batch norm"):
        E.train_network(bnorm, x, y, epochs=1, seed=0, chunk=2)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "16"])
def test_bad_chunk(toy_test, bad):
    x, y = _toy(2, seed=0)
    net = get_network("ConvNet", 1, 2, 16, **SMALL)
    with pytest.raises(ValueError, match="chunk"):
        E.train_network(net, x, y, epochs=1, chunk=bad)
    with pytest.raises(ValueError, match="chunk"):
        test_accuracy(net, toy_test, chunk=bad)
    with pytest.raises(ValueError, match="batch_size"):
        test_accuracy(net, toy_test, batch_size=0)


def test_chunked_test_pass_matches_direct_argmax(toy_test):
    """Oracle: argmax of one eval-mode forward over the whole test set, computed here."""
    x, y = _toy(3, seed=5, noise=1.0)
    net = get_network("ConvNet", 1, 2, 16, seed=1, **SMALL)
    E.train_network(net, x, y, epochs=2, lr=0.05, seed=0)
    net.eval()
    with torch.no_grad():
        expect = 100.0 * float((net(toy_test.images).argmax(1) == toy_test.labels).float().mean())
    net.train()
    for bs, chunk in ((1000, None), (1000, 1), (7, 3), (30, "auto")):
        assert test_accuracy(net, toy_test, batch_size=bs, chunk=chunk) == pytest.approx(expect)
    assert net.training                                   # mode restored


def test_bf16_test_pass_against_fp32_logits(toy_test):
    """precision="bf16": where the CPU has native bf16 the test pass runs a bf16 copy, and every
    prediction whose fp32 top-2 logit margin exceeds bf16 rounding agrees with fp32 (oracle: the
    fp32 logits computed here); elsewhere it falls back to fp32 with a RuntimeWarning."""
    from splatdd.precision import bf16_native
    x, y = _toy(5, seed=6, noise=1.0)
    net = get_network("ConvNet", 1, 2, 16, seed=2, **SMALL)
    E.train_network(net, x, y, epochs=3, lr=0.05, seed=0)
    net.eval()
    with torch.no_grad():
        logits = net(toy_test.images)
    fp32 = test_accuracy(net, toy_test)
    if bf16_native("cpu"):
        got = test_accuracy(net, toy_test, precision="bf16")
        top2 = logits.topk(2, dim=1).values
        unsure = int(((top2[:, 0] - top2[:, 1]) < 0.05 * top2.abs().max()).sum())
        assert abs(got - fp32) <= 100.0 * unsure / len(toy_test.labels) + 1e-9
    else:
        with pytest.warns(RuntimeWarning, match="bf16"):
            assert test_accuracy(net, toy_test, precision="bf16") == fp32
    assert next(net.parameters()).dtype == torch.float32           # the net itself untouched


def test_protocol_test_precision_option():
    from splatdd.protocols import get_protocol
    quick = get_protocol("quick")(test_precision="bf16")
    assert "test_precision bf16" in quick.describe()
    assert "test_precision" not in get_protocol("paper")().config()   # fp32: configs unchanged
    with pytest.raises(ValueError, match="test_precision"):
        get_protocol("paper")(test_precision="fp16")
