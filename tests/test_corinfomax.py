"""CorInfoMax: the loss over consecutive steps against hand-computed values, gradients, the state
under DDP, and the singular case."""

import math

import pytest
import torch

from ssl_tune.distributed import gather_with_grad
from ssl_tune.evaluation import effective_rank
from tests.ranks import run_on_ranks
from trainers.base import Diverged
from trainers.corinfomax import CorInfoMaxLoss

HYPER = dict(alpha=7.0, eps=1e-3, la_R=0.3, la_mu=0.2, R_ini=1.5)


def hand_state_update(z, mu, R, *, la_mu, la_R):
    n, d = len(z), len(z[0])
    mean = [sum(row[j] for row in z) / n for j in range(d)]
    mu = [la_mu * mu[j] + (1 - la_mu) * mean[j] for j in range(d)]
    centred = [[row[j] - mu[j] for j in range(d)] for row in z]
    R = [[la_R * R[a][b] + (1 - la_R) * sum(c[a] * c[b] for c in centred) / n for b in range(d)] for a in range(d)]
    return mu, R


def hand_logdet_2x2(R, eps):
    return math.log((R[0][0] + eps) * (R[1][1] + eps) - R[0][1] * R[1][0])


def test_two_consecutive_steps_match_hand_computed_values():
    steps = [
        ([[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]], [[0.8, 0.6], [0.6, -0.8], [-0.6, -0.8]]),
        ([[-1.0, 0.0], [0.28, 0.96], [0.6, 0.8]], [[-0.8, 0.6], [0.0, 1.0], [0.96, 0.28]]),
    ]
    criterion = CorInfoMaxLoss(2, **HYPER)
    h = HYPER
    state = {view: ([0.0, 0.0], [[h["R_ini"], 0.0], [0.0, h["R_ini"]]]) for view in (1, 2)}
    for z1, z2 in steps:
        for view, z in ((1, z1), (2, z2)):
            state[view] = hand_state_update(z, *state[view], la_mu=h["la_mu"], la_R=h["la_R"])
        cov = -(hand_logdet_2x2(state[1][1], h["eps"]) + hand_logdet_2x2(state[2][1], h["eps"])) / 2
        sim = sum((a - b) ** 2 for r1, r2 in zip(z1, z2) for a, b in zip(r1, r2)) / (3 * 2)
        out = criterion(torch.tensor(z1, dtype=torch.float64), torch.tensor(z2, dtype=torch.float64))
        assert out.cov.item() == pytest.approx(cov, rel=1e-12)
        assert out.sim.item() == pytest.approx(sim, rel=1e-12)
        assert out.loss.item() == pytest.approx(h["alpha"] * sim + cov, rel=1e-12)
        for view in (1, 2):
            mu, R = state[view]
            torch.testing.assert_close(getattr(criterion, f"mu{view}"), torch.tensor(mu, dtype=torch.float64))
            torch.testing.assert_close(getattr(criterion, f"R{view}"), torch.tensor(R, dtype=torch.float64))


def test_gradient_flows_through_the_current_batch_only():
    torch.manual_seed(0)
    criterion = CorInfoMaxLoss(3, **HYPER)
    criterion(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64))  # non-trivial state
    for name, buffer in criterion.named_buffers():
        assert buffer.dtype == torch.float64 and buffer.grad_fn is None and not buffer.requires_grad, name
    criterion.eval()  # gradcheck calls forward many times: keep the state fixed
    state = {name: b.clone() for name, b in criterion.named_buffers()}
    z1 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: criterion(a, b).loss, (z1, z2))
    for name, buffer in criterion.named_buffers():
        assert torch.equal(buffer, state[name]), f"eval mode changed {name}"


def _two_rank_steps(rank, batches):
    criterion = CorInfoMaxLoss(4, **HYPER)
    results = []
    for z1, z2 in batches:
        local = [z[rank * 3 : (rank + 1) * 3].clone().requires_grad_() for z in (z1, z2)]
        out = criterion(*(gather_with_grad(z) for z in local))
        out.loss.backward()
        results.append((out.loss.item(), [z.grad for z in local]))
    return results, {name: b.clone() for name, b in criterion.named_buffers()}


def test_two_ranks_hold_the_state_and_loss_of_one_process_on_the_global_batch():
    torch.manual_seed(1)
    batches = [[torch.nn.functional.normalize(torch.randn(6, 4), dim=1) for _ in range(2)] for _ in range(2)]
    criterion = CorInfoMaxLoss(4, **HYPER)
    expected = []
    for z1, z2 in batches:
        z1, z2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        out = criterion(z1, z2)
        out.loss.backward()
        expected.append((out.loss.item(), [z1.grad, z2.grad]))
    for rank, (steps, buffers) in enumerate(run_on_ranks(_two_rank_steps, 2, batches)):
        for (loss, grads), (want_loss, want_grads) in zip(steps, expected):
            assert loss == pytest.approx(want_loss, rel=1e-6)
            for grad, want in zip(grads, want_grads):
                # Every rank's identical loss contributes to the gradient of its rows: W * dL/dz
                # (DDP divides parameter gradients by W afterwards).
                torch.testing.assert_close(grad / 2, want[rank * 3 : (rank + 1) * 3], rtol=1e-5, atol=1e-7)
        for name, buffer in criterion.named_buffers():
            torch.testing.assert_close(buffers[name], buffer, rtol=0, atol=1e-12, msg=name)


def test_singular_covariance_is_reported_not_returned_as_nan():
    criterion = CorInfoMaxLoss(2, alpha=1.0, eps=1e-30, la_R=0.0, la_mu=0.0)
    z = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])  # one direction only: a rank-1 covariance
    with pytest.raises(Diverged, match=r"R1 \+ eps\*I is not positive definite .eps=1e-30.; increase method.eps"):
        criterion(z, z)
    with pytest.raises(Diverged, match="projector output is non-finite"):
        CorInfoMaxLoss(2, **HYPER)(torch.full((2, 2), float("nan")), z)


def test_effective_rank_runs_from_collapse_to_all_directions():
    torch.manual_seed(0)
    collapsed = torch.randn(64, 1) @ torch.randn(1, 8)
    assert effective_rank(collapsed).item() == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(torch.eye(8)).item() == pytest.approx(8.0, rel=1e-4)
    assert 6.0 < effective_rank(torch.randn(512, 8)).item() < 8.0
