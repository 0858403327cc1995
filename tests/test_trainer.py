"""The shared loop, for every registered method: exact resume, divergence, and DDP global-batch equality."""

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from ssl_tune.evaluation import RANKME_SAMPLES, effective_rank, rankme
from ssl_tune.specfile import spec_from_dict
from ssl_tune.testing import run_on_ranks
from tests.conftest import method_names, method_spec_dict, tiny_dataset, tiny_spec_dict
from trainers.loop import CHECKPOINT_FILE, Reporter, Trainer, build_method


class Recorder(Reporter):
    def __init__(self, checkpoint_dir=None):
        self.epochs, self.checkpoint_dir = [], checkpoint_dir

    def on_epoch(self, metrics, write_checkpoint):
        self.epochs.append(metrics)
        if self.checkpoint_dir is not None and write_checkpoint is not None:
            write_checkpoint(self.checkpoint_dir / f"epoch{int(metrics['epoch'])}")


METHODS = method_names()  # every method the registry finds, a researcher's own included


@pytest.mark.parametrize("method", METHODS)
def test_resume_continues_exactly(tmp_path, method):
    spec = spec_from_dict(method_spec_dict(method, training={"epochs": 3, "batch_size": 32, "seed": 3}))
    straight = Recorder(tmp_path)
    first = Trainer(spec, dataset=tiny_dataset())
    first.fit(straight)

    resumed = Trainer(spec, dataset=tiny_dataset())
    resumed.load_checkpoint(tmp_path / "epoch1")
    assert resumed.epoch == 1
    after = Recorder()
    resumed.fit(after)
    assert [m["epoch"] for m in after.epochs] == [2.0, 3.0]
    for a, b in zip(after.epochs, straight.epochs[1:]):
        assert a.keys() == b.keys()
        for key in a:
            if key != "images_per_s":
                assert a[key] == b[key], key
    for (name, p), q in zip(first.method.state_dict().items(), resumed.method.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_console_shows_the_evaluation_steps_on_a_terminal(tmp_path):
    import io

    from ssl_tune.cli import ConsoleReporter

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    spec = spec_from_dict(tiny_spec_dict(training={"epochs": 1, "batch_size": 32, "seed": 0}))
    Trainer(spec, dataset=tiny_dataset()).fit(ConsoleReporter(stream=stream))
    out = stream.getvalue()
    steps = ["(the baseline) ...", "random-init kNN top-1", "epoch 1/1 [", "epoch 1: features and kNN ...",
             "epoch 1: linear probe(s) ...", "epoch 1/1  loss"]
    assert all(step in out for step in steps)
    assert [out.index(step) for step in steps] == sorted(out.index(step) for step in steps)


def test_checkpoint_loads_with_weights_only(tmp_path):
    spec = spec_from_dict(tiny_spec_dict(training={"epochs": 1, "batch_size": 32}))
    trainer = Trainer(spec, dataset=tiny_dataset())
    result = trainer.fit(Recorder(tmp_path))
    state = torch.load(tmp_path / "epoch1" / CHECKPOINT_FILE, weights_only=True)
    assert state["epoch"] == 1 and state["spec"]["method"]["name"] == "twist"
    assert set(state) >= {"model", "optimizer", "scheduler", "rng", "baseline"}
    # the label-free objective: RankMe of the training split's representations, no labels involved
    train_features, _ = trainer.features()
    assert result.metrics["rankme"] == pytest.approx(effective_rank(train_features).item())
    assert 1.0 <= result.metrics["rankme"] <= train_features.shape[1]
    # on a large split, evenly spaced rows: the same estimate as all of them, within 1%
    many = torch.randn(60_000, 32) @ torch.randn(32, 32)
    assert rankme(many) == pytest.approx(effective_rank(many).item(), rel=0.01) and len(many[::3]) <= RANKME_SAMPLES


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_loss_stops_as_diverged_without_a_checkpoint(tmp_path, method):
    raw = method_spec_dict(method, training={"epochs": 3, "batch_size": 32})
    raw["optimizer"] = {"name": "sgd", "lr": 1e12, "momentum": 0.0, "warmup_epochs": 0}
    recorder = Recorder(tmp_path)
    result = Trainer(spec_from_dict(raw), dataset=tiny_dataset()).fit(recorder)
    assert result.status == "diverged"
    assert "non-finite" in result.message
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [f"epoch{int(m['epoch'])}" for m in recorder.epochs]
    assert result.epochs_completed == len(recorder.epochs) < 3


# --- DDP: 2 ranks on halves of the batch == 1 process on the whole batch ------------------


def _views(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 1, 12, 12, generator=g) for _ in range(2)]


def _step(method, views):
    out = method(views)
    out.loss.backward()
    return out.loss.item()


def _ddp_step(rank, raw):
    spec = spec_from_dict(raw)
    method = build_method(spec, in_channels=1)
    model = DistributedDataParallel(method)
    views = [v[rank * 4 : (rank + 1) * 4] for v in _views()]
    loss = _step(model, views)
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad}
    buffers = {n: b.clone() for n, b in method.named_buffers()}
    return loss, grads, buffers


@pytest.mark.parametrize("method", METHODS)
def test_two_rank_step_equals_one_process_on_the_whole_batch(method):
    raw = method_spec_dict(method)
    method = build_method(spec_from_dict(raw), in_channels=1)
    loss = _step(method, _views())
    results = run_on_ranks(_ddp_step, 2, raw)
    for rank_loss, grads, buffers in results:
        assert rank_loss == pytest.approx(loss, rel=1e-5)
        trainable = {n: p for n, p in method.named_parameters() if p.requires_grad}
        assert grads.keys() == trainable.keys()
        for name, p in trainable.items():
            # float32 sums in another order: errors scale with the tensor's largest entries (sharp
            # temperatures, e.g. ISD's 0.02, give gradients of order 1 next to entries near 0)
            atol = max(1e-6, 1e-5 * p.grad.abs().max().item())
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=atol, msg=name)
        for name, b in method.named_buffers():
            torch.testing.assert_close(buffers[name], b, rtol=1e-4, atol=1e-6, msg=name)
