"""TWIST loss: hand-computed values, gradients, and the global-batch property under DDP."""

import math

import pytest
import torch

from tests.ranks import run_on_ranks
from trainers.twist import twist_loss


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _reference(a, b, lam1, lam2, tau, eps):
    """The loss written out with Python floats, term by term as in methods.md."""
    pa, pb = [_softmax(r) for r in a], [_softmax(r) for r in b]
    qa, qb = [_softmax([v / tau for v in r]) for r in a], [_softmax([v / tau for v in r]) for r in b]
    n, c = len(a), len(a[0])

    def kl(p, q):
        return sum(sum(p[i][j] * (math.log(p[i][j] + eps) - math.log(q[i][j] + eps)) for j in range(c)) for i in range(n)) / n

    def eh(q):
        return sum(-sum(q[i][j] * math.log(q[i][j] + eps) for j in range(c)) for i in range(n)) / n

    def he(q):
        mean = [sum(q[i][j] for i in range(n)) / n for j in range(c)]
        return -sum(m * math.log(m + eps) for m in mean)

    k = 0.5 * (kl(pa, pb) + kl(pb, pa))
    h1 = 0.5 * (eh(qa) + eh(qb))
    h2 = 0.5 * (he(qa) + he(qb))
    return k + (1 + lam1) * h1 - lam2 * h2, k, h1, h2


@pytest.mark.parametrize("lam1,lam2,tau", [(0.0, 1.0, 1.0), (-0.6, 1.5, 0.5), (0.3, 0.5, 2.0)])
def test_matches_hand_computed_values(lam1, lam2, tau):
    a = [[0.5, -1.0, 2.0], [0.1, 0.2, -0.3]]
    b = [[1.5, 0.0, -1.0], [-0.4, 0.9, 0.3]]
    out = twist_loss(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                     lam1=lam1, lam2=lam2, tau=tau, eps=1e-5)
    expected = _reference(a, b, lam1, lam2, tau, 1e-5)
    for got, want in zip((out.loss, out.kl, out.eh, out.he), expected):
        assert got.item() == pytest.approx(want, rel=1e-6)


def test_identical_views_have_zero_kl_and_entropy_bounds():
    logits = torch.randn(16, 10)
    out = twist_loss(logits, logits.clone())
    assert out.kl.item() == pytest.approx(0.0, abs=1e-6)
    assert 0 <= out.eh.item() <= out.he.item() + 1e-5 <= math.log(10) + 1e-4


def test_gradcheck():
    torch.manual_seed(0)
    a = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: twist_loss(x, y, lam1=0.2, lam2=1.3, tau=0.7).loss, (a, b))


def _sharded_loss(rank: int, a: torch.Tensor, b: torch.Tensor):
    from ssl_tune.distributed import gather_with_grad

    n = a.shape[0] // 2
    la = a[rank * n : (rank + 1) * n].clone().requires_grad_(True)
    lb = b[rank * n : (rank + 1) * n].clone().requires_grad_(True)
    loss = twist_loss(gather_with_grad(la), gather_with_grad(lb), lam1=0.1, lam2=1.2, tau=0.8).loss
    loss.backward()
    # Backward through the gather sums the W identical losses: divide by W as DDP's averaging does.
    return loss.item(), la.grad / 2, lb.grad / 2


def test_two_shards_gathered_give_the_whole_batch_loss_and_gradients():
    torch.manual_seed(1)
    a, b = torch.randn(8, 6), torch.randn(8, 6)
    whole_a, whole_b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    whole = twist_loss(whole_a, whole_b, lam1=0.1, lam2=1.2, tau=0.8).loss
    whole.backward()
    results = run_on_ranks(_sharded_loss, 2, a, b)
    for rank, (loss, grad_a, grad_b) in enumerate(results):
        assert loss == pytest.approx(whole.item(), rel=1e-6)
        torch.testing.assert_close(grad_a, whole_a.grad[rank * 4 : (rank + 1) * 4], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad_b, whole_b.grad[rank * 4 : (rank + 1) * 4], rtol=1e-5, atol=1e-7)
