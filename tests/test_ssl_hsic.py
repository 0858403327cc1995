"""SSL-HSIC: exact estimators against a direct computation, random features against the exact
values, gradients, the learned bandwidth and the EMA target."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_tune.spec.files import spec_from_dict
from tests.conftest import tiny_spec_dict
from trainers.build import build_method
from trainers.ssl_hsic import bandwidth_objective, hsic_loss, imq_random_features


def hsic_spec_dict(**method):
    raw = tiny_spec_dict()
    raw["method"] = {"name": "ssl_hsic", "gamma": 2.0, "bandwidth": 0.8, "num_rff_features": 64, **method}
    return raw


def unit_views(k, batch, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=1) for _ in range(k)]


def direct_hsic(views, c):
    """Term by term over all n^2 pairs, with the centring matrix H written out."""
    k, batch = len(views), views[0].shape[0]
    rows = [(v, i) for v in range(k) for i in range(batch)]
    n = len(rows)
    x = torch.cat(views)
    K = torch.zeros(n, n, dtype=torch.float64)
    for a in range(n):
        for b in range(n):
            K[a, b] = c / math.sqrt(float(((x[a] - x[b]) ** 2).sum()) + c * c)
    same = sum(float(K[a, b]) for a in range(n) for b in range(n) if rows[a][1] == rows[b][1])
    hsic_xy = same / (batch * k * (k - 1)) - float(K.sum()) / n**2
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    hsic_xx = float(((H @ K @ H) ** 2).sum()) / n**2
    return hsic_xy, hsic_xx


@pytest.mark.parametrize("k", [2, 4])
def test_exact_estimators_match_a_direct_computation(k):
    views = unit_views(k, batch=5, dim=3)
    want_xy, want_xx = direct_hsic(views, c=0.7)
    out = hsic_loss(views, gamma=3.0, scale=0.7)
    assert out.hsic_xy.item() == pytest.approx(want_xy, rel=1e-10)
    assert out.hsic_xx.item() == pytest.approx(want_xx, rel=1e-10)
    assert out.loss.item() == pytest.approx(3.0 * math.sqrt(want_xx) - want_xy, rel=1e-10)


def test_random_feature_estimators_converge_to_the_exact_ones():
    views = unit_views(4, batch=16, dim=8)
    exact = hsic_loss(views, gamma=3.0, scale=1.3)
    errors = []
    for num_features in (32, 4096):
        g = torch.Generator().manual_seed(1)
        draws = [hsic_loss(views, gamma=3.0, scale=1.3, rff=(
            *imq_random_features(num_features, 8, generator=g, dtype=torch.float64),
            *imq_random_features(num_features, 8, generator=g, dtype=torch.float64))) for _ in range(20)]
        xy = torch.stack([d.hsic_xy for d in draws]).mean()
        xx = torch.stack([d.hsic_xx for d in draws]).mean()
        errors.append((abs(xy - exact.hsic_xy) / exact.hsic_xy).item() + (abs(xx - exact.hsic_xx) / exact.hsic_xx).item())
    assert errors[1] < 0.02
    assert errors[1] < errors[0] / 3


def test_random_features_approximate_the_imq_kernel():
    g = torch.Generator().manual_seed(0)
    w, _ = imq_random_features(200_000, 5, generator=g, dtype=torch.float64)
    for distance in (0.3, 1.0, 2.5):
        delta = torch.zeros(5, dtype=torch.float64)
        delta[0] = distance
        assert torch.cos(w @ delta).mean().item() == pytest.approx(1 / math.sqrt(1 + distance**2), abs=5e-3)


@pytest.mark.parametrize("estimator", ["exact", "rff"])
def test_gradients(estimator):
    views = [v.requires_grad_() for v in unit_views(2, batch=4, dim=3)]
    g = torch.Generator().manual_seed(2)
    rff = None if estimator == "exact" else (
        *imq_random_features(16, 3, generator=g, dtype=torch.float64), *imq_random_features(16, 3, generator=g, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b: hsic_loss([a, b], gamma=1.5, scale=0.9, rff=rff).loss, tuple(views))


def test_hsic_terms_see_the_bandwidth_as_a_constant():
    scale = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    out = hsic_loss(unit_views(2, batch=4, dim=3), gamma=1.5, scale=scale)
    assert not out.loss.requires_grad


def test_learned_bandwidth_moves_towards_the_objective_optimum():
    # d/dc of log|d kappa / d dist^2| is 1/c - 3c / (dist + c^2): zero at c^2 = dist / 2 for one
    # distance. Random unit vectors in 8 dimensions are about sqrt(2) apart, so the optimum is near 1.
    views = [v.float() for v in unit_views(2, batch=64, dim=8)]
    for start, sign in ((5.0, 1), (0.05, -1)):
        scale = torch.tensor(start, requires_grad=True)
        bandwidth_objective(views, scale, num_samples=256, generator=torch.Generator().manual_seed(0)).backward()
        assert sign * scale.grad > 0  # gradient descent moves c towards the optimum from both sides


def test_bandwidth_has_its_own_optimizer_and_the_logged_loss_is_the_hsic_loss():
    method = build_method(spec_from_dict(hsic_spec_dict(learn_bandwidth=True)), in_channels=1)
    optimizer = method.auxiliary_optimizer()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["params"] == [method.bandwidth]
    views = [torch.randn(32, 1, 12, 12), torch.randn(32, 1, 12, 12)]
    out = method.eval()(views)
    assert out.loss.item() == pytest.approx((2.0 * out.terms["hsic_xx"].sqrt() - out.terms["hsic_xy"]).item(), rel=1e-5)
    out.loss.backward()
    assert method.bandwidth.grad is not None and method.bandwidth.grad.item() != 0
    fixed = build_method(spec_from_dict(hsic_spec_dict(learn_bandwidth=False)), in_channels=1)
    assert fixed.auxiliary_optimizer() is None and "bandwidth" in dict(fixed.named_buffers())


def test_target_follows_the_cosine_ema_rule():
    method = build_method(spec_from_dict(hsic_spec_dict(target_momentum=0.9)), in_channels=1)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    before = [t.clone() for t in method.target.parameters()]
    method([torch.randn(32, 1, 12, 12), torch.randn(32, 1, 12, 12)]).loss.backward()
    assert all(t.grad is None for t in method.target.parameters())
    optimizer.step()
    progress = 0.25
    method.after_optimizer_step(progress)
    m = 1 - 0.1 * (math.cos(math.pi * progress) + 1) / 2
    online = list(method.backbone.parameters()) + list(method.projector.parameters())
    for t, old, s in zip(method.target.parameters(), before, online):
        torch.testing.assert_close(t, m * old + (1 - m) * s.detach())
    assert any(not torch.equal(t, old) for t, old in zip(method.target.parameters(), before))


def test_without_target_the_loss_sees_two_views():
    method = build_method(spec_from_dict(hsic_spec_dict(target_network=False, estimator="exact")), in_channels=1).eval()
    views = [torch.randn(8, 1, 12, 12), torch.randn(8, 1, 12, 12)]
    with torch.no_grad():
        predictions = [F.normalize(method.predictor(method.projector(method.backbone(v))), dim=1) for v in views]
        want = hsic_loss(predictions, gamma=2.0, scale=0.8)
        assert method.target is None
        assert method(views).loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
