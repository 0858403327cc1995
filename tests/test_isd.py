"""ISD: the loss against hand-computed values, gradients, the EMA teacher and the FIFO bank."""

import math

import pytest
import torch

from ssl_tune.spec import SpecError
from ssl_tune.spec.files import spec_from_dict
from tests.conftest import tiny_spec_dict
from trainers.isd import isd_loss
from trainers.build import build_method


def isd_spec_dict(**method):
    raw = tiny_spec_dict()
    raw["method"] = {"name": "isd", "t_teacher": 0.1, "t_student": 0.5, "momentum": 0.9, "bank_size": 64, **method}
    return raw


def _normalise(row):
    n = math.sqrt(sum(v * v for v in row))
    return [v / n for v in row]


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def test_loss_matches_hand_computed_values():
    student = [[1.0, 2.0, 0.5], [-0.3, 0.1, 0.8]]
    teacher = [[0.7, 1.5, 0.2], [0.1, -0.4, 1.0]]
    bank = [_normalise(r) for r in ([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0])]
    t_s, t_t = 0.5, 0.1
    total = 0.0
    for s, t in zip(student, teacher):
        q, k = _normalise(s), _normalise(t)
        p_s = _softmax([sum(a * b for a, b in zip(q, row)) / t_s for row in bank])
        p_t = _softmax([sum(a * b for a, b in zip(k, row)) / t_t for row in bank])
        total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    out = isd_loss(torch.tensor(student, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64),
                   torch.tensor(bank, dtype=torch.float64), t_student=t_s, t_teacher=t_t)
    assert out.loss.item() == pytest.approx(total / 2, rel=1e-9)


def test_gradient_flows_into_the_student_only():
    torch.manual_seed(0)
    student = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    bank = torch.nn.functional.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1)
    assert torch.autograd.gradcheck(lambda s: isd_loss(s, teacher, bank, t_student=0.3, t_teacher=0.1).loss, (student,))
    isd_loss(student, teacher, bank, t_student=0.3, t_teacher=0.1).loss.backward()
    assert student.grad is not None and teacher.grad is None


def test_identical_distributions_give_zero_loss():
    x = torch.randn(5, 4)
    bank = torch.nn.functional.normalize(torch.randn(7, 4), dim=1)
    assert isd_loss(x, x, bank, t_student=0.2, t_teacher=0.2).loss.item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_gets_no_gradient_and_follows_the_ema_rule():
    method = build_method(spec_from_dict(isd_spec_dict()), in_channels=1)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    views = [torch.randn(32, 1, 12, 12), torch.randn(32, 1, 12, 12)]
    before = [t.clone() for t in method.teacher.parameters()]
    method(views).loss.backward()
    assert all(t.grad is None for t in method.teacher.parameters())
    optimizer.step()
    method.after_optimizer_step(0.1)
    student = list(method.backbone.parameters()) + list(method.projector.parameters())
    for t, old, s in zip(method.teacher.parameters(), before, student):
        torch.testing.assert_close(t, 0.9 * old + 0.1 * s.detach())
    assert any(not torch.equal(t, old) for t, old in zip(method.teacher.parameters(), before))


def test_bank_is_fifo_and_wraps_around():
    raw = isd_spec_dict(bank_size=8)
    raw["training"]["batch_size"] = 4
    method = build_method(spec_from_dict(raw), in_channels=1)
    batches = [torch.full((4, method.bank.shape[1]), float(i)) for i in (1, 2, 3)]
    for b in batches:
        method.enqueue(b)
    assert method.bank[:4].eq(3).all() and method.bank[4:].eq(2).all()  # 1 was overwritten by 3
    assert int(method.bank_ptr) == 4


def test_forward_enqueues_the_batch_after_using_the_bank():
    method = build_method(spec_from_dict(isd_spec_dict()), in_channels=1)
    bank_before = method.bank.clone()
    method([torch.randn(32, 1, 12, 12), torch.randn(32, 1, 12, 12)]).loss.backward()
    assert int(method.bank_ptr) == 32
    assert torch.equal(method.bank[32:], bank_before[32:]) and not torch.equal(method.bank[:32], bank_before[:32])
    torch.testing.assert_close(method.bank[:32].norm(dim=1), torch.ones(32))


def test_bank_size_must_be_a_multiple_of_the_global_batch():
    with pytest.raises(SpecError, match="bank_size .100. must be a multiple of training.batch_size .32."):
        spec_from_dict(isd_spec_dict(bank_size=100))


def test_v1_uses_one_temperature():
    spec = spec_from_dict(isd_spec_dict(variant="v1", t_student=123.0))
    method = build_method(spec, in_channels=1)
    views = [torch.randn(32, 1, 12, 12), torch.randn(32, 1, 12, 12)]
    method.eval()  # no enqueue: the same bank for both calls
    with torch.no_grad():
        loss = method(views).loss
        spec_same = spec_from_dict(isd_spec_dict(variant="plus", t_student=0.1))
        other = build_method(spec_same, in_channels=1).eval()
        assert other(views).loss.item() == pytest.approx(loss.item(), rel=1e-5)


def test_teacher_parameters_stay_frozen_after_batchnorm_conversion():
    method = build_method(spec_from_dict(isd_spec_dict()), in_channels=1)
    assert not any(p.requires_grad for p in method.teacher.parameters())
    assert all(p.requires_grad for p in method.backbone.parameters())
