"""The shared loop, for every registered method: exact resume, divergence, and DDP global-batch equality."""

import pytest
import yaml
import torch
from torch.nn.parallel import DistributedDataParallel

from ssl_tune.evaluation import RANKME_SAMPLES, effective_rank, rankme
from ssl_tune.spec.files import spec_from_dict
from tests.ranks import run_on_ranks
from tests.conftest import TEST_METHODS, method_names, method_spec_dict, tiny_dataset, tiny_spec_dict
from trainers import METHOD_PATH_ENV
from trainers.build import build_method
from trainers.loop import CHECKPOINT_FILE, Reporter, Trainer


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
            if not key.startswith("images_per_s"):  # timings
                assert a[key] == b[key], key
    for (name, p), q in zip(first.method.state_dict().items(), resumed.method.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_console_shows_the_evaluation_steps_on_a_terminal(tmp_path):
    import io

    from ssl_tune.training import ConsoleReporter

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


def _evaluate_on_rank(rank, raw):
    trainer = Trainer(spec_from_dict(raw), dataset=tiny_dataset(n=90), device=torch.device("cpu"))
    metrics = trainer.evaluate(Reporter(), last=True)
    return metrics, trainer.final_outputs is not None


def test_two_rank_evaluation_equals_one_process_and_only_rank_0_holds_the_bank():
    raw = tiny_spec_dict(training={"epochs": 1, "batch_size": 16}, evaluation={"linear_probe_epochs": 5, "bank_size": 40})
    one, _ = _evaluate_on_rank(0, raw)
    assert {"knn_top1", "knn_top5", "rankme", "linear_top1"} <= set(one)
    (first, first_holds), (second, second_holds) = run_on_ranks(_evaluate_on_rank, 2, raw)
    assert first_holds and not second_holds  # the figures' arrays: rank 0's only
    assert first == second  # rank 0's metrics, broadcast
    assert first == pytest.approx(one, rel=1e-4)


def test_rankme_objective_extracts_only_its_sample_before_the_last_epoch(monkeypatch):
    raw = tiny_spec_dict(training={"epochs": 2, "batch_size": 16}, search={"metric": "rankme"})
    trainer = Trainer(spec_from_dict(raw), dataset=tiny_dataset(n=90), device=torch.device("cpu"))
    extracted = []
    features = trainer._features
    monkeypatch.setattr(trainer, "_features", lambda split, rows: extracted.append(
        len(getattr(trainer.dataset, f"{split}_images")) if rows is None else len(rows)) or features(split, rows))
    assert set(trainer.evaluate(Reporter(), last=False)) == {"rankme"}
    assert extracted == [90]  # its sample of the training split (all 90 here), no test split
    extracted.clear()
    assert {"knn_top1", "rankme"} <= set(trainer.evaluate(Reporter(), last=True))
    assert len(extracted) == 2  # the bank and the test split


@pytest.mark.parametrize("stage, field", [("resident data", "data.on_device: false"),
                                          ("training step", "training.batch_size"),
                                          ("evaluation", "evaluation.batch_size")])
def test_out_of_device_memory_names_the_stage_the_batch_and_the_field(tmp_path, monkeypatch, capsys, stage, field):
    """The device's error in each stage: copying the resident subset to the device (`gather_rows`), or raised by a
    method of the tests (`tests/methods/twist_oom.py`) in its forward pass or its backbone's evaluation."""
    import trainers.loop
    from ssl_tune.cli import main

    raw = tiny_spec_dict(training={"epochs": 1, "batch_size": 64}, data={"on_device": True, "subset": 0.5})
    if stage == "resident data":
        def gather(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        monkeypatch.setattr(trainers.loop, "gather_rows", gather)
    else:
        monkeypatch.setenv(METHOD_PATH_ENV, TEST_METHODS)
        raw["method"] = {**raw["method"], "name": "twist_oom", "oom_in": stage}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    assert main(["train", str(spec), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"error: out of device memory during the {stage} on cpu (training.batch_size 64, 64 per worker" in err
    assert field in err and "Traceback" not in err


def test_knn_against_the_bank_in_chunks_equals_one_block():
    from ssl_tune.evaluation import knn_ranking

    g = torch.Generator().manual_seed(0)
    bank, test = torch.randn(1000, 16, generator=g), torch.randn(300, 16, generator=g)
    labels = torch.randint(0, 7, (1000,), generator=g)
    whole = knn_ranking(bank, labels, test, num_classes=7, k=20, chunk_size=10_000, bank_chunk=10_000)
    chunked = knn_ranking(bank, labels, test, num_classes=7, k=20, chunk_size=64, bank_chunk=97)
    assert torch.equal(whole[:, 0], chunked[:, 0])


def test_the_evaluation_bank_is_a_fixed_stratified_subset():
    from ssl_tune.evaluation import bank_rows

    labels = torch.cat([torch.zeros(600), torch.ones(300), torch.full((100,), 2)]).long()[torch.randperm(1000)]
    rows = bank_rows(labels, 100)
    assert torch.equal(rows, bank_rows(labels, 100))  # the same for every trial, epoch and seed
    assert torch.equal(rows, rows.sort().values)
    assert torch.bincount(labels[rows]).tolist() == [60, 30, 10]
    assert bank_rows(labels, 1000) is None and bank_rows(labels, None) is None


VIT_TINY_28 = {"name": "timm:vit_tiny_patch16_224", "kwargs": {"img_size": 28, "patch_size": 4}}


@pytest.mark.parametrize("method,backbone,dim", [(m, VIT_TINY_28, 192) for m in METHODS]
                         + [("twist", {"name": "mobilenet_v3_small"}, 1024)],
                         ids=[f"{m}-vit_tiny" for m in METHODS] + ["twist-mobilenet_v3_small"])
def test_every_method_trains_a_vit_tiny_and_its_checkpoint_loads_with_preprocess(tmp_path, method, backbone, dim):
    """ViT-tiny at the bundled data's 28 px (and a torchvision model other than a ResNet), a few steps,
    AdamW with warm-up and cosine decay."""
    import ssl_tune

    spec = spec_from_dict(method_spec_dict(method, backbone=backbone, training={"epochs": 1, "batch_size": 32},
                                           optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05,
                                                      "warmup_epochs": 0.5}, evaluation={"linear_probe": False}))
    trainer = Trainer(spec, dataset=tiny_dataset(n=64, size=28))  # 2 steps: the warm-up's, then the decay's
    assert trainer.method.backbone.output_dim == dim
    result = trainer.fit()
    assert result.status == "finished" and 0 <= result.metrics["knn_top1"] <= 100
    trainer.write_checkpoint(tmp_path / "checkpoint")
    trainer.write_export(tmp_path / "export")  # what a trial uploads to MLflow and `ssl-tune export` writes

    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    trainer.method.backbone.eval()
    with torch.no_grad():
        expected = trainer.method.backbone(trainer.normalizer(images.float() / 255))
        for source in ("checkpoint", "export"):
            backbone, preprocess = ssl_tune.load_backbone(tmp_path / source)
            torch.testing.assert_close(backbone(preprocess(images)), expected)


# --- the paths a GPU takes, run as far as a CPU allows ---------------------------------------------

def _one_step_loss(spec, dataset):
    trainer = Trainer(spec, dataset=dataset)
    views = next(iter(trainer.loader.epoch(0)))
    out = trainer.train_step(views, 0.0)
    return trainer, out.loss.detach().float().item()


def test_bf16_autocast_runs_the_step_in_bfloat16_and_stays_near_fp32():
    dataset = tiny_dataset(n=64, size=16)
    _, fp32 = _one_step_loss(spec_from_dict(tiny_spec_dict(training={"epochs": 1, "batch_size": 32, "precision": "fp32"})),
                             dataset)
    spec = spec_from_dict(tiny_spec_dict(training={"epochs": 1, "batch_size": 32, "precision": "bf16"}))
    trainer = Trainer(spec, dataset=dataset)
    assert trainer.autocast_dtype == torch.bfloat16
    seen = []
    trainer.method.backbone.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss = trainer.train_step(next(iter(trainer.loader.epoch(0))), 0.0).loss.float().item()
    assert seen == [torch.bfloat16] * len(seen) and seen
    assert abs(loss - fp32) <= 0.02 * abs(fp32)


def test_channels_last_on_cpu_gives_the_contiguous_step():
    dataset = tiny_dataset(n=64, size=16)
    _, contiguous = _one_step_loss(spec_from_dict(tiny_spec_dict(training={"epochs": 1, "batch_size": 32,
                                                                           "channels_last": False})), dataset)
    trainer, channels_last = _one_step_loss(spec_from_dict(tiny_spec_dict(training={"epochs": 1, "batch_size": 32,
                                                                                     "channels_last": True})), dataset)
    conv = trainer.method.backbone.features[0].weight
    assert trainer.channels_last and conv.is_contiguous(memory_format=torch.channels_last)
    assert channels_last == pytest.approx(contiguous, rel=1e-5)


def test_cuda_generator_state_is_saved_and_restored_through_the_checkpoint_functions(monkeypatch):
    from ssl_tune.trials import checkpoints

    generator = {"state": torch.arange(8, dtype=torch.uint8)}
    calls = []

    def get_state(device):
        calls.append(("get", device))
        return generator["state"].clone()

    def set_state(state, device):
        calls.append(("set", device))
        generator["state"] = state.clone()

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    cuda = torch.device("cuda", 3)
    saved = checkpoints.rng_state(cuda)
    cpu_draw = torch.rand(3)
    generator["state"] = torch.zeros(8, dtype=torch.uint8)  # the generators move on
    checkpoints.restore_rng(saved, cuda)
    assert torch.equal(generator["state"], torch.arange(8, dtype=torch.uint8)) and torch.equal(torch.rand(3), cpu_draw)
    assert calls == [("get", cuda), ("set", cuda)]
    checkpoints.restore_rng(saved, torch.device("cpu"))  # a CUDA state onto a CPU run: the CPU generator only
    assert calls == [("get", cuda), ("set", cuda)] and "cuda" not in checkpoints.rng_state(torch.device("cpu"))


@pytest.mark.parametrize("method", METHODS)
def test_sync_batchnorm_replaces_every_batchnorm_on_cuda_keeping_keys_and_frozen_parameters(method):
    """NCCL's SyncBatchNorm takes no CPU tensors, so its arithmetic runs on a GPU only (gpu-check);
    here: what the conversion does to the model."""
    from ssl_tune import distributed

    spec = spec_from_dict(method_spec_dict(method))
    plain = build_method(spec, in_channels=1)
    frozen = {n for n, p in plain.named_parameters() if not p.requires_grad}
    keys = set(plain.state_dict())
    synced = distributed.convert_batchnorm(build_method(spec, in_channels=1), torch.device("cuda", 0))
    norms = [m for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert set(synced.state_dict()) == keys
    assert {n for n, p in synced.named_parameters() if not p.requires_grad} == frozen


def test_checkpoints_are_written_every_checkpoint_every_epochs_at_asha_decisions_and_at_the_end():
    writers = []

    class Checkpoints(Reporter):
        def on_epoch(self, metrics, write_checkpoint):
            writers.append((int(metrics["epoch"]), write_checkpoint is not None))

    spec = spec_from_dict(tiny_spec_dict(training={"epochs": 7, "batch_size": 32, "checkpoint_every": 4},
                                         search={"scheduler": "asha", "grace_period": 1, "reduction_factor": 3}))
    Trainer(spec, dataset=tiny_dataset(n=64)).fit(Checkpoints())
    # ASHA decides at epochs 1 and 3; every 4th epoch; and the last
    assert [epoch for epoch, written in writers if written] == [1, 3, 4, 7]
