"""Train one configuration into a directory, without Ray: what `ssl-tune train` runs, and
`ssl_tune.train` for Python users.

The directory gets the latest `checkpoint.pt` after every epoch, `spec.json`, `metrics.json` (status,
per-epoch history, data cache) and, after the last epoch, the final evaluation arrays
(`evaluation.npz`) with their figures (`figures/*.png`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ssl_tune.data.datasets import ImageDataset
from ssl_tune.evaluation import EVALUATION_FILE, load_arrays
from ssl_tune.spec import SpecBase
from trainers.loop import Reporter, Trainer, TrainResult

SPEC_FILE = "spec.json"
METRICS_FILE = "metrics.json"


class _CheckpointEveryEpoch(Reporter):
    """Writes the latest checkpoint into the run's directory after every epoch, then passes each
    event on to the caller's reporter."""

    def __init__(self, out_dir: Path, reporter: Reporter) -> None:
        self.out_dir, self.reporter = out_dir, reporter

    def on_start(self, trainer: Trainer) -> None:
        self.reporter.on_start(trainer)

    def on_step(self, epoch: int, step: int, steps: int) -> None:
        self.reporter.on_step(epoch, step, steps)

    def on_phase(self, description: str) -> None:
        self.reporter.on_phase(description)

    def on_epoch(self, metrics: dict[str, float], write_checkpoint) -> None:
        if write_checkpoint is not None:
            write_checkpoint(self.out_dir)
        self.reporter.on_epoch(metrics, None)


def train(spec: SpecBase, out_dir: str | Path, *, resume: str | Path | None = None, reporter: Reporter | None = None,
          dataset: ImageDataset | None = None, data_info: dict | None = None) -> TrainResult:
    """Train the resolved `spec` into `out_dir` (see the module docstring); returns the result.

    `resume`: a `checkpoint.pt` (or its directory) to continue from. `reporter` receives the loop's
    progress (`trainers.loop.Reporter`; `ssl_tune.cli.ConsoleReporter` prints it). `dataset`: the
    spec's data set if the caller opened it already (else it is opened from its cache);
    `data_info` is recorded under "data" in metrics.json.
    Raises `SpecError` for settings that do not fit the data (e.g. a batch larger than the data set).
    """
    out_dir = Path(out_dir)
    trainer = Trainer(spec, dataset=dataset)
    if resume is not None:
        trainer.load_checkpoint(Path(resume))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SPEC_FILE).write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
    result = trainer.fit(_CheckpointEveryEpoch(out_dir, reporter or Reporter()))
    (out_dir / METRICS_FILE).write_text(json.dumps({"status": result.status, "history": result.history,
                                                    "data": data_info or {}}, indent=2))
    if (out_dir / EVALUATION_FILE).is_file():
        write_figures(out_dir)
    return result


def write_figures(run_dir: Path) -> list[Path]:
    """Draw the figures of a run directory's final evaluation arrays into `run_dir/figures`."""
    from ssl_tune.report import figures

    directory = run_dir / figures.FIGURE_DIR
    directory.mkdir(exist_ok=True)
    written = []
    for name, fig in figures.evaluation_figures(load_arrays(run_dir / EVALUATION_FILE)).items():
        figures.save_figure(fig, directory / f"{name}.png")
        written.append(directory / f"{name}.png")
    return written


class ConsoleReporter(Reporter):
    """Prints a progress bar (on a terminal) and one line per epoch: what `ssl-tune train` shows."""

    def __init__(self, stream=None, resumed_from: Path | None = None) -> None:
        self.stream = stream or sys.stdout  # read when created: tests and notebooks replace sys.stdout
        self.tty = self.stream.isatty()
        self.resumed_from = resumed_from
        self.epochs = 0

    def on_start(self, trainer) -> None:
        spec = trainer.spec
        self.epochs = spec.training.epochs
        clear = "\r\033[K" if self.tty else ""
        if self.resumed_from is not None:
            print(clear, f"resumed from {self.resumed_from} at epoch {trainer.epoch}", sep="", file=self.stream)
            clear = ""
        print(clear, f"training {spec.method.name} on {spec.data.name} ({len(trainer.dataset.ssl_images)} images, "
              f"{spec.training.epochs} epochs, batch {spec.training.batch_size}, {trainer.device})",
              sep="", file=self.stream)
        b = trainer.baseline
        print(f"random-init kNN top-1 {b['knn_top1_random_init']:.2f}% (the baseline to beat)", file=self.stream, flush=True)

    def on_step(self, epoch: int, step: int, steps: int) -> None:
        if self.tty:
            filled = int(30 * step / steps)
            print(f"\repoch {epoch}/{self.epochs} [{'#' * filled}{'.' * (30 - filled)}] {step}/{steps}", end="",
                  file=self.stream, flush=True)

    def on_phase(self, description: str) -> None:
        if self.tty:  # a status line, overwritten by the next one (logs get only the epoch lines)
            print(f"\r\033[K{description} ...", end="", file=self.stream, flush=True)

    def on_epoch(self, metrics: dict[str, float], write_checkpoint) -> None:
        from ssl_tune.report.figures import TRAINING_METRICS

        skip = {"loss", *TRAINING_METRICS}
        terms = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in skip and not k.startswith(("knn", "linear")))
        knn = f"  kNN top-1 {metrics['knn_top1']:.2f}%" if "knn_top1" in metrics else ""
        print(
            "\r\033[K" if self.tty else "",
            f"epoch {int(metrics['epoch'])}/{self.epochs}  loss {metrics['loss']:.4f} ({terms})  lr {metrics['lr']:.3g}  "
            f"{metrics['images_per_s']:.0f} img/s{knn}",
            sep="", file=self.stream, flush=True,
        )


def summary(result: TrainResult, seconds: float, out_dir: Path) -> str:
    """The end of `ssl-tune train`: the status and the kNN and linear-probe accuracies against the random init."""
    m = result.metrics
    rows = [("kNN top-1, random init", m.get("knn_top1_random_init")), ("kNN top-1, trained", m.get("knn_top1")),
            ("kNN top-5, trained", m.get("knn_top5"))]
    rows += [(k.replace("_", " "), v) for k, v in m.items() if k.startswith("linear_top1")]
    lines = [f"{result.status} after {result.epochs_completed} epochs in {seconds:.0f} s"]
    lines += [f"  {name:<32} {value:6.2f}%" for name, value in rows if value is not None]
    lines.append(f"  checkpoint and metrics in {out_dir}")
    return "\n".join(lines)
