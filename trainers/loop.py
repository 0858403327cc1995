"""The one training loop every method runs in: data, optimisation, evaluation, checkpoints.

`Trainer.fit` is the same code whether it is called by `ssl-tune train` in one process or by
each Ray Train worker of a trial under DDP; only the `Reporter` differs (console or Ray).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl_tune import distributed
from ssl_tune.searching import budget
from ssl_tune.trials import checkpoints
from ssl_tune.trials.checkpoints import CHECKPOINT_FILE  # noqa: F401  (re-exported)
from ssl_tune.data.cache import open_dataset
from ssl_tune.data.datasets import ImageDataset, stratified_subset, subset_rows
from ssl_tune.data.loader import Normalizer, ViewLoader, gather_rows
from ssl_tune.evaluation import (EVALUATION_FILE, bank_rows, confusion_counts, extract_features, knn_ranking,
                                 linear_probe, load_arrays, principal_components, ranking_accuracy, rankme, rankme_rows,
                                 save_arrays)
from ssl_tune.preprocess import InputContract
from ssl_tune.spec import RESIDENT_FRACTION, SpecBase, SpecError
from trainers.base import Diverged
from trainers.build import build_method, default_device
from trainers.optim import build_optimizers, warmup_cosine

CHECKPOINT_FORMAT = 1

CheckpointWriter = Callable[[Path], Path]  # writes a checkpoint into the directory; returns its file


class DeviceOutOfMemory(RuntimeError):
    """The device ran out of memory in a named stage of training; the message says what to change."""


class Reporter:
    """Receives the loop's progress; subclasses print it or send it to Ray Train."""

    def on_start(self, trainer: Trainer) -> None:
        """Called once the model and data are ready, before the first epoch."""

    def on_step(self, epoch: int, step: int, steps: int) -> None:
        """Called after every optimisation step."""

    def on_phase(self, description: str) -> None:
        """Called before a long step that is not training (an evaluation), saying what it is."""

    def on_epoch(self, metrics: dict[str, float], write_checkpoint: CheckpointWriter | None) -> None:
        """Called after every epoch with metrics averaged over ranks.

        `write_checkpoint(directory)` saves everything a resume needs into the directory; it is
        given to rank 0 only (None on other ranks).
        """


@dataclass
class TrainResult:
    status: str  # "finished" or "diverged"
    epochs_completed: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    message: str = ""


class Trainer:
    """Trains one resolved spec. Call `fit`; `load_checkpoint` first to resume."""

    def __init__(self, spec: SpecBase, *, dataset: ImageDataset | None = None, device: torch.device | None = None) -> None:
        if not spec.is_resolved:
            raise ValueError("Trainer needs a resolved spec (no search ranges); call spec.resolve() first")
        self.spec = spec
        self.device = device or default_device()
        t = spec.training
        self.dataset = dataset or open_dataset(spec.data)[0]
        d = self.dataset
        # `data.subset`: the rows of the training images this trial trains on (None: all of them)
        self.subset = subset_rows(d, spec.data.subset, spec.data.subset_seed)
        trained = len(self.subset) if self.subset is not None else len(d.ssl_images)
        if t.batch_size > trained:
            raise SpecError(f"training.batch_size ({t.batch_size}) is larger than data set {spec.data.name!r} "
                            f"({trained} images{' in data.subset' if self.subset is not None else ''})")
        self.normalizer = Normalizer(d.train_images, stats=d.channel_stats).to(self.device)
        self.method = build_method(spec, self.dataset.channels, self.device, self.dataset.image_size).to(self.device)
        cuda = self.device.type == "cuda"
        precision = t.precision if t.precision != "auto" else ("bf16" if cuda else "fp32")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.channels_last = cuda if t.channels_last == "auto" else t.channels_last
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.model: nn.Module = self.method
        if distributed.is_distributed():
            self.model = DistributedDataParallel(self.method, device_ids=[self.device.index] if cuda else None)
        self.data_resident = self._data_on_device()
        self.loader = self._view_loader()
        # The labelled training images evaluation uses (`evaluation.bank_size`), the same every epoch; with
        # `data.subset` of labelled images, drawn from the subset (the images the trial learnt from).
        self.bank: torch.Tensor | None  # the bank's rows; None: every training image
        if self.subset is not None and d.pretrain_images is None:
            within = bank_rows(d.train_labels[self.subset], spec.evaluation.bank_size)
            self.bank = self.subset if within is None else self.subset[within]
        else:
            self.bank = bank_rows(d.train_labels, spec.evaluation.bank_size)
        o = spec.optimizer
        self.optimizer, self.auxiliary_optimizer = build_optimizers(self.method, spec)
        steps = self.loader.steps_per_epoch
        self.total_steps = steps * t.epochs
        schedule = warmup_cosine(self.total_steps, round(o.warmup_epochs * steps), o.final_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.epoch = 0  # epochs completed
        # ASHA stops a trial at these epochs: its objective's checkpoint must exist (`training.checkpoint_every`).
        self.decision_epochs = set(budget.rungs(spec))
        self.baseline: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        # After the last epoch: the arrays of the final evaluation, saved next to the final
        # checkpoint (`EVALUATION_FILE`) for the figures.
        self.final_outputs: dict[str, Any] | None = None  # tensors, and the class names

    def _view_loader(self) -> ViewLoader:
        """The training images' loader: resident on the device (only the subset's rows go there), or streamed
        (the loader draws the subset's rows)."""
        d, t = self.dataset, self.spec.training
        with self.out_of_memory("resident data", "set data.on_device: false (stream the images)"):
            images, rows, aspects = d.ssl_images, self.subset, d.ssl_aspects
            if self.data_resident:
                if rows is not None:
                    images, aspects = gather_rows(images, rows, self.device), (aspects[rows] if aspects is not None else None)
                    rows = None
                images = images.to(self.device)
        return ViewLoader(images, self.method.view_augmentations(self.spec.data.augmentation), self.normalizer,
                          global_batch_size=t.batch_size, seed=t.seed, rank=distributed.rank(),
                          world_size=distributed.world_size(), device=self.device, stream=not self.data_resident,
                          aspects=aspects, size=d.image_size, rows=rows)

    # --- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "spec": self.spec.model_dump(mode="json"),
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "auxiliary_optimizer": self.auxiliary_optimizer.state_dict() if self.auxiliary_optimizer else None,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": checkpoints.rng_state(self.device),
            "baseline": self.baseline,
            "history": self.history,
            "input": self.input_contract().to_dict(),
        }

    def input_contract(self) -> InputContract:
        """What the backbone takes: the data's channels and size, and the normalisation it was trained with."""
        return InputContract(channels=self.dataset.channels, image_size=self.dataset.image_size,
                             mean=tuple(self.normalizer.mean.flatten().tolist()),
                             std=tuple(self.normalizer.std.flatten().tolist()), dataset=self.spec.data.name)

    def write_checkpoint(self, directory: Path) -> Path:
        """Write `checkpoint.pt` into `directory`, whole and verified (`ssl_tune.trials.checkpoints.save`);
        raises CheckpointError naming the path when it cannot."""
        path = checkpoints.save(self.state_dict(), directory)
        if self.final_outputs is not None:
            try:
                save_arrays(directory / EVALUATION_FILE, self.final_outputs)
            except OSError as exc:
                raise checkpoints.write_error(directory / EVALUATION_FILE, exc) from None
        return path

    def write_export(self, directory: Path) -> Path:
        """Write this epoch's export into `directory`: what `load_backbone` needs, without the optimizer
        state (`ssl_tune.trials.checkpoints.write_export`)."""
        return checkpoints.write_export(directory, self.state_dict())

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything `write_checkpoint` saved; `path` is the file or its directory."""
        path = path / CHECKPOINT_FILE if path.is_dir() else path
        state = checkpoints.load(path, map_location=self.device)  # CheckpointError names a damaged one
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: unsupported checkpoint format {state.get('format')!r}")
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.auxiliary_optimizer is not None:
            self.auxiliary_optimizer.load_state_dict(state["auxiliary_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        checkpoints.restore_rng(state["rng"], self.device)
        self.epoch = state["epoch"]
        self.baseline = dict(state["baseline"])
        self.history = [dict(h) for h in state["history"]]
        evaluation = path.parent / EVALUATION_FILE  # next to the last epoch's checkpoint only
        self.final_outputs = ({k: v.tolist() if v.dtype.kind == "U" else torch.from_numpy(v)  # names stay strings
                               for k, v in load_arrays(evaluation).items()} if evaluation.exists() else None)

    # --- evaluation ----------------------------------------------------------------------
    #
    # Every rank extracts its shard of the features (under the training precision); only rank 0 holds
    # them and runs kNN, RankMe and the probes, and the others wait for its metrics.

    def _features(self, split: str, rows: torch.Tensor | None) -> torch.Tensor | None:
        d = self.dataset
        with self.out_of_memory("evaluation", "lower evaluation.batch_size"):
            return extract_features(self.method.backbone, getattr(d, f"{split}_images"), self.normalizer,
                                    device=self.device, rows=rows, batch_size=self.spec.evaluation.batch_size,
                                    dtype=self.autocast_dtype, to_all=False, aspects=getattr(d, f"{split}_aspects"),
                                    size=d.image_size)

    def bank_labels(self) -> torch.Tensor:
        labels = self.dataset.train_labels
        return labels if self.bank is None else labels[self.bank]

    def features(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The bank's and the test split's features, on rank 0 (None on the others, which extract their shards)."""
        train, test = self._features("train", self.bank), self._features("test", None)
        return (train, test) if train is not None and test is not None else None

    def knn(self, train_features: torch.Tensor, test_features: torch.Tensor) -> torch.Tensor:
        """The kNN classifier's class ranking for every test image (N x C, best first), against the bank."""
        e, d = self.spec.evaluation, self.dataset
        return knn_ranking(train_features, self.bank_labels(), test_features, num_classes=d.num_classes,
                           k=e.knn_k, temperature=e.knn_temperature)

    def final_evaluation(self, train_features: torch.Tensor, test_features: torch.Tensor) -> dict[str, float]:
        e, d, seed = self.spec.evaluation, self.dataset, self.spec.training.seed
        labels = self.bank_labels()
        out: dict[str, float] = {}
        probe = dict(num_classes=d.num_classes, epochs=e.linear_probe_epochs, seed=seed)
        if e.linear_probe:
            out["linear_top1"] = linear_probe(train_features, labels, test_features, d.test_labels, **probe)
        for fraction in e.label_fractions:
            idx = stratified_subset(labels, fraction, seed).to(train_features.device)
            out[f"linear_top1_labels_{fraction * 100:g}pct"] = linear_probe(
                train_features[idx], labels[idx.cpu()], test_features, d.test_labels, **probe
            )
        return out

    def evaluate(self, reporter: Reporter, *, last: bool) -> dict[str, float]:
        """The evaluated epoch's metrics, the same on every rank.

        With `search.metric: rankme`, epochs before the last extract only RankMe's sample of the bank
        (`rankme_rows`: the rows `rankme` takes of the bank's features at the last epoch), not the whole
        bank and the test split: the objective needs no more.
        """
        d = self.dataset
        metrics: dict[str, float] = {}
        if self.spec.search.metric == "rankme" and not last:
            reporter.on_phase(f"epoch {self.epoch}: RankMe")
            bank = self.bank if self.bank is not None else torch.arange(len(d.train_images))
            sample = self._features("train", bank[rankme_rows(len(bank))])
            if sample is not None:
                metrics["rankme"] = rankme(sample)
            return distributed.broadcast_from_first(metrics)
        reporter.on_phase(f"epoch {self.epoch}: features and kNN")
        features = self.features()
        if features is not None:  # rank 0
            train_features, test_features = features
            with self.out_of_memory("evaluation", "lower evaluation.bank_size"):
                ranked = self.knn(train_features, test_features)
                metrics["knn_top1"], metrics["knn_top5"] = ranking_accuracy(ranked, d.test_labels)
                # Label-free: RankMe of the training images' representations (`search.metric: rankme`).
                metrics["rankme"] = rankme(train_features)
                if last:
                    reporter.on_phase(f"epoch {self.epoch}: linear probe(s)")
                    metrics.update(self.final_evaluation(train_features, test_features))
                    self.final_outputs = {
                        "embedding_2d": principal_components(test_features), "labels": d.test_labels.cpu(),
                        "confusion": confusion_counts(ranked[:, 0], d.test_labels, d.num_classes),
                        **({"class_names": list(d.class_names)} if d.class_names else {})}
        return distributed.broadcast_from_first(metrics)

    # --- device memory -------------------------------------------------------------------

    def _data_on_device(self) -> bool:
        """`data.on_device`: auto keeps the training images resident on a GPU when they take at most
        RESIDENT_FRACTION of its free memory, and streams them on a CPU (where resident gains nothing)."""
        choice = self.spec.data.on_device
        if choice != "auto":
            return bool(choice)
        if self.device.type != "cuda":
            return False
        images = self.dataset.ssl_images
        kept = len(self.subset) if self.subset is not None else len(images)
        free, _ = torch.cuda.mem_get_info(self.device)
        return kept * images[0].numel() * images.element_size() <= RESIDENT_FRACTION * free

    def peak_memory(self) -> dict[str, float]:
        """Rank 0's peak device memory since the last call, in GiB (`peak_device_memory_gib`); none on a CPU."""
        if self.device.type != "cuda":
            return {}
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        return {"peak_device_memory_gib": distributed.broadcast_from_first({"peak": peak})["peak"]}

    @contextlib.contextmanager
    def out_of_memory(self, stage: str, advice: str):
        """Turn the device's out-of-memory error in `stage` into `DeviceOutOfMemory`, which names the stage,
        the batch and `advice`, the field to change (a trial ends on it: a restart would run out again)."""
        try:
            yield
        except torch.OutOfMemoryError as exc:
            t = self.spec.training
            raise DeviceOutOfMemory(
                f"out of device memory during the {stage} on {self.device} (training.batch_size {t.batch_size}, "
                f"{t.batch_size // distributed.world_size()} per worker; evaluation.batch_size "
                f"{self.spec.evaluation.batch_size}): {advice}. {str(exc).splitlines()[0][:300]}") from None

    # --- training ------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, views: list[torch.Tensor], progress: float):
        """One optimisation step on one batch of views; `progress` is the fraction of all steps done
        (for schedules inside the method). Returns the method's output (loss and terms)."""
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        optimizers = [self.optimizer] + ([self.auxiliary_optimizer] if self.auxiliary_optimizer else [])
        with self.out_of_memory("training step", "lower training.batch_size, or add resources.num_workers"):
            with self._autocast():
                out = self.model(views)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(out.loss).backward()
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.method.after_optimizer_step(progress)
        return out

    def train_epoch(self, reporter: Reporter) -> dict[str, float]:
        self.model.train()
        steps = self.loader.steps_per_epoch
        sums: dict[str, torch.Tensor] = {}
        start = time.perf_counter()
        for step, views in enumerate(self.loader.epoch(self.epoch)):
            out = self.train_step(views, (self.epoch * steps + step) / self.total_steps)
            for name, value in {"loss": out.loss, **out.terms}.items():
                value = value.detach().float()
                sums[name] = sums[name] + value if name in sums else value
            reporter.on_step(self.epoch + 1, step + 1, steps)
        elapsed = time.perf_counter() - start
        metrics = {name: (total / steps).item() for name, total in sums.items()}
        if not all(math.isfinite(v) for v in metrics.values()):
            raise Diverged(f"non-finite loss in epoch {self.epoch + 1}: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        # Each rank's throughput; summed over ranks by multiplying the mean by the world size below.
        metrics["images_per_s"] = steps * self.loader.local_batch_size / elapsed
        return metrics

    def fit(self, reporter: Reporter | None = None) -> TrainResult:
        """Train from the current epoch to `training.epochs`, reporting after each epoch."""
        reporter = reporter or Reporter()
        t, e = self.spec.training, self.spec.evaluation
        if not self.baseline:
            # The same architecture at initialisation: the number any SSL run must beat.
            reporter.on_phase("kNN of the network at initialisation (the baseline)")
            features = self.features()
            if features is not None:
                top1, top5 = ranking_accuracy(self.knn(*features), self.dataset.test_labels)
                self.baseline = {"knn_top1_random_init": top1, "knn_top5_random_init": top5}
            self.baseline = distributed.broadcast_from_first(self.baseline)
        reporter.on_start(self)
        while self.epoch < t.epochs:
            try:
                metrics = self.train_epoch(reporter)
            except Diverged as exc:
                return TrainResult("diverged", self.epoch, self.history[-1] if self.history else {}, self.history, str(exc))
            metrics = distributed.all_reduce_mean(metrics, self.device)
            metrics["images_per_s"] *= distributed.world_size()
            self.epoch += 1
            last = self.epoch == t.epochs
            if self.epoch % e.eval_every == 0 or last:
                start = time.perf_counter()
                metrics.update(self.evaluate(reporter, last=last))
                evaluation_s = time.perf_counter() - start
                # Throughput with the evaluation's time counted in: what an epoch really costs.
                images = self.loader.steps_per_epoch * t.batch_size
                metrics["images_per_s_with_eval"] = images / (images / metrics["images_per_s"] + evaluation_s)
                metrics.update(self.peak_memory())
            metrics = {"epoch": float(self.epoch), **metrics, **self.baseline}
            self.history.append(metrics)
            due = self.epoch % t.checkpoint_every == 0 or last or self.epoch in self.decision_epochs
            reporter.on_epoch(metrics, self.write_checkpoint if due and distributed.rank() == 0 else None)
        return TrainResult("finished", self.epoch, self.history[-1] if self.history else {}, self.history)

