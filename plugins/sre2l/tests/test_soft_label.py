"""The soft-label protocol: students match the teacher better than hard-label students, options,
registration, and an evaluation on the tiny dataset."""
import pytest
import torch

from splatdd.evaluate import EvalResult
from splatdd.models import get_network
from splatdd.protocols import check_protocol_class, get_protocol
from splatdd.testing import make_tiny_real
from splatdd_sre2l.augment import apply_crops, sample_crops
from splatdd_sre2l.soft_label import SoftLabelProtocol, soft_label_kl, train_student
from splatdd_sre2l.teacher import TeacherError, load_teacher


def test_registered_and_valid():
    check_protocol_class(SoftLabelProtocol)
    assert get_protocol("soft-label") is SoftLabelProtocol
    assert SoftLabelProtocol.label_kind == "soft"


def test_kl_closed_form():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[2.0, 0.0]])
    p = torch.softmax(t / 2, 1)[0]
    q = torch.softmax(s / 2, 1)[0]
    expect = float((p * (p / q).log()).sum())
    assert soft_label_kl(s, t, 2.0).item() == pytest.approx(expect, rel=1e-6)
    assert soft_label_kl(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_soft_student_matches_teacher_better_than_hard_student(tiny_teacher):
    """Same images, crops, seed and steps: the KL to the teacher on training crops (fresh draws)
    is lower for the student trained on the teacher's soft labels."""
    teacher, _ = load_teacher(tiny_teacher)
    real = make_tiny_real(40)
    idx = torch.cat([torch.arange(c * 40, c * 40 + 4) for c in range(3)])
    images, labels = real.images[idx], real.labels[idx]
    kw = dict(temperature=4.0, steps=80, lr=3e-3, batch_size=12, seed=0)
    kls = {}
    for soft in (True, False):
        net = get_network("ConvNetD2", 1, 3, (8, 8), width=8, seed=0)
        train_student(net, images, labels, teacher, soft=soft, **kw).eval()
        g = torch.Generator().manual_seed(123)
        total = 0.0
        with torch.no_grad():
            for _ in range(10):
                x = apply_crops(images, sample_crops(len(images), g))
                total += soft_label_kl(net(x), teacher(x), 4.0).item()
        kls[soft] = total / 10
    assert kls[True] < kls[False], kls


def test_options(tiny_teacher):
    with pytest.raises(TypeError, match="teacher"):
        SoftLabelProtocol()
    with pytest.raises(TypeError, match="bogus"):
        SoftLabelProtocol(teacher=tiny_teacher, bogus=1)
    for bad in ({"temperature": 0}, {"epochs": 0}, {"steps": 1.5}, {"batch_size": True},
                {"lr": -1}, {"crop_scale": [2, 3]}, {"width": 0}):
        with pytest.raises(ValueError):
            SoftLabelProtocol(teacher=tiny_teacher, **bad)
    p = SoftLabelProtocol(teacher=tiny_teacher, epochs=2, batch_size=5)
    assert p.num_steps(11) == 2 * 3
    assert SoftLabelProtocol(teacher=tiny_teacher, steps=7).num_steps(11) == 7
    assert "soft labels" in p.describe() and "temperature 20.0" in p.describe()


def test_evaluate_tiny(tiny_teacher, tmp_path):
    real = make_tiny_real(40)
    test = make_tiny_real(20, seed=1)
    idx = torch.cat([torch.arange(c * 40, c * 40 + 2) for c in range(3)])
    proto = SoftLabelProtocol(teacher=tiny_teacher, steps=5, batch_size=6, temperature=4.0,
                              width=8)
    res = proto.evaluate(real.images[idx], real.labels[idx], test, model="ConvNetD2", runs=2,
                         seed=0)
    assert isinstance(res, EvalResult) and len(res.accs) == 2
    assert all(0.0 <= a <= 100.0 for a in res.accs)
    again = proto.evaluate(real.images[idx], real.labels[idx], test, model="ConvNetD2", runs=2,
                           seed=0)
    assert again.accs == res.accs                       # seeded
    with pytest.raises(ValueError, match="resolution"):
        proto.evaluate(torch.zeros(3, 1, 4, 4), real.labels[:3], test, model="ConvNetD2", runs=1)
    with pytest.raises(TeacherError, match="no teacher file"):
        SoftLabelProtocol(teacher=tmp_path, steps=1).evaluate(real.images[idx], real.labels[idx],
                                                             test, runs=1)
