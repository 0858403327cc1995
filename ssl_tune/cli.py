"""The `ssl-tune` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Exit statuses (README, "Exit status"): 0 a search that completed with at least one trial through;
# 1 an unexpected error (a traceback); 2 bad input or a failed pre-flight check, before any trial;
# 3 a search that completed but in which every trial failed; 130 stopped by Ctrl-C or SIGTERM.
EXIT_BAD_INPUT = 2
EXIT_ALL_TRIALS_FAILED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class ConsoleReporter:
    """A `trainers.loop.Reporter` that prints a progress bar (on a terminal) and one line per epoch.

    (Not a subclass, so that `ssl-tune --help` need not import torch.)
    """

    def __init__(self, stream=sys.stdout, resumed_from: Path | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty()
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
            print(f"\repoch {epoch}/{self.epochs} [{'#' * filled}{'.' * (30 - filled)}] {step}/{steps}", end="", file=self.stream, flush=True)

    def on_phase(self, description: str) -> None:
        if self.tty:  # a status line, overwritten by the next one (logs get only the epoch lines)
            print(f"\r\033[K{description} ...", end="", file=self.stream, flush=True)

    def on_epoch(self, metrics: dict[str, float], write_checkpoint) -> None:
        skip = {"epoch", "loss", "lr", "images_per_s"}
        terms = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in skip and not k.startswith(("knn", "linear")))
        knn = f"  kNN top-1 {metrics['knn_top1']:.2f}%" if "knn_top1" in metrics else ""
        print(
            "\r\033[K" if self.tty else "",
            f"epoch {int(metrics['epoch'])}/{self.epochs}  loss {metrics['loss']:.4f} ({terms})  lr {metrics['lr']:.3g}  "
            f"{metrics['images_per_s']:.0f} img/s{knn}",
            sep="", file=self.stream, flush=True,
        )


def _summary(result, seconds: float, out_dir: Path) -> str:
    m = result.metrics
    rows = [("kNN top-1, random init", m.get("knn_top1_random_init")), ("kNN top-1, trained", m.get("knn_top1")),
            ("kNN top-5, trained", m.get("knn_top5"))]
    rows += [(k.replace("_", " "), v) for k, v in m.items() if k.startswith("linear_top1")]
    lines = [f"{result.status} after {result.epochs_completed} epochs in {seconds:.0f} s"]
    lines += [f"  {name:<32} {value:6.2f}%" for name, value in rows if value is not None]
    lines.append(f"  checkpoint and metrics in {out_dir}")
    return "\n".join(lines)


def _open_data(spec, spec_path: Path):
    """The spec's data set from its cache (built first if needed), with the cache's summary printed;
    None (after printing the error) when the data is not usable."""
    from ssl_tune.data.cache import open_dataset
    from ssl_tune.data.datasets import DataError

    try:
        dataset, info = open_dataset(spec.data)
    except DataError as exc:
        print(f"error: data set {spec.data.name!r} (spec {spec_path}, field data.root): {exc}", file=sys.stderr)
        return None, None
    if info is not None:
        print(info.summary())
    return dataset, info


def cmd_prepare(args: argparse.Namespace) -> int:
    from ssl_tune.specfile import load_spec

    spec = load_spec(args.spec, args.set)
    if spec.data.name == "fashion_mnist_subset":
        print("the bundled data set (fashion_mnist_subset) ships decoded inside the package: nothing to prepare")
        return 0
    dataset, _ = _open_data(spec, args.spec)
    return 0 if dataset is not None else EXIT_BAD_INPUT


def cmd_train(args: argparse.Namespace) -> int:
    from ssl_tune.spec import SpecError
    from ssl_tune.specfile import load_spec
    from ssl_tune.training import train

    spec = load_spec(args.spec, args.set).resolve()
    out_dir = args.out or Path("ssl_tune_runs") / "train" / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    dataset, data = _open_data(spec, args.spec)
    if dataset is None:
        return EXIT_BAD_INPUT
    data_info = {"cache": str(data.path), "skipped": data.skipped} if data is not None else {"cache": None, "skipped": 0}
    try:
        result = train(spec, out_dir, resume=args.resume, reporter=ConsoleReporter(resumed_from=args.resume),
                       dataset=dataset, data_info=data_info)
    except SpecError as exc:  # checks that need the data, e.g. the batch size against its size
        print(f"error: invalid spec {args.spec}:\n  {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(_summary(result, time.perf_counter() - started, out_dir))
    if result.status == "diverged":
        print(f"error: training diverged: {result.message}; the last good checkpoint is in {out_dir}", file=sys.stderr)
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ssl_tune.search import run_search
    from ssl_tune.specfile import load_spec

    spec = load_spec(args.spec, args.set)
    outcome = run_search(spec, spec_source=str(args.spec), name=args.name, address=args.address, verbose=args.verbose,
                         tracking_uri=args.tracking_uri)
    return _report_outcome(outcome, spec)


def cmd_resume(args: argparse.Namespace) -> int:
    from ssl_tune.search import resume_search

    outcome = resume_search(args.experiment_or_run, tracking_uri=args.tracking_uri, address=args.address,
                            verbose=args.verbose, storage_path=args.storage_path)
    return _report_outcome(outcome, None)


def _report_outcome(outcome, spec) -> int:
    from ssl_tune import tracking
    from ssl_tune.spec import SpecBase

    where = f"MLflow: experiment {outcome.experiment!r}, parent run {outcome.parent_run_id} in {outcome.tracking_uri}"
    if outcome.interrupted:
        when = "in its confirmation stage" if outcome.in_confirmation else \
            f"after {outcome.trials_done} finished trial(s)"
        print(f"\nsearch interrupted {when}; its state and checkpoints are saved, unfinished trials are marked "
              "KILLED in MLflow")
        print(where)
        uri = "" if outcome.tracking_uri == tracking.resolve_uri(None) else f" --tracking-uri {outcome.tracking_uri}"
        default_storage = str(Path(SpecBase.model_fields["storage_path"].default).resolve())
        storage = "" if outcome.storage in ("", default_storage) else f" --storage-path {outcome.storage}"
        print(f"resume with:  ssl-tune resume {outcome.parent_run_id}{uri}{storage}")
        return EXIT_INTERRUPTED
    objective = f", objective {spec.search.metric} ({spec.search.mode})" if spec is not None else ""
    print(f"\nsearch finished: {len(outcome.rows)} trials{objective}")
    print(tracking.format_table(outcome.rows, _leaderboard_columns(outcome.rows)))
    _print_best_per_method(outcome.rows, spec.search.mode if spec is not None else "max")
    _print_confirmation(outcome.confirmation, outcome.verdict)
    print(f"\n{where}")
    if outcome.all_failed:
        print(f"error: every trial failed; the reasons are in the table above and in each trial run's "
              f"{tracking.TAG_ERROR} tag (the parent run is marked FAILED)", file=sys.stderr)
        return EXIT_ALL_TRIALS_FAILED
    print(f"browse:  ssl-tune ui            export the best backbone:  ssl-tune export {outcome.experiment}")
    return 0


def _print_best_per_method(rows: list[dict], mode: str) -> None:
    """A search across methods: each method's best trial."""
    from ssl_tune import tracking

    per_method = tracking.best_per_method(rows, mode)
    if len(per_method) > 1:
        print("\nbest trial per method:")
        print(tracking.format_table(per_method, _leaderboard_columns(per_method)))


def _print_confirmation(rows: list[dict], verdict: str) -> None:
    """The confirmation stage's table (mean, SD, 95% interval, paired gain over the default) and verdict."""
    from ssl_tune import tracking

    if rows or verdict:
        print("\nconfirmed on fresh seeds (best mean first; export takes the first row's best seed):")
        print(tracking.format_table(rows, tracking.confirmation_columns(rows)))
        print(verdict)


def _naming_store(exc: Exception, uri: str) -> str:
    """An error of a read-only command, with the tracking store it looked in."""
    return str(exc) if uri in str(exc) else f"{exc} (tracking store {uri})"


def _leaderboard_columns(rows: list[dict]) -> list[str]:
    return [c for c in (rows[0] if rows else {}) if c not in ("run_id", "trial_id")]


def cmd_results(args: argparse.Namespace) -> int:
    from ssl_tune import tracking

    uri = tracking.resolve_uri(args.tracking_uri)
    try:
        client = tracking.existing_store_client(uri)
        parent = tracking.find_parent_run(client, args.experiment)
    except LookupError as exc:
        print(f"error: {_naming_store(exc, uri)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    rows = tracking.leaderboard(client, parent)
    print(tracking.format_table(rows, _leaderboard_columns(rows)))
    _print_best_per_method(rows, parent.data.tags.get(tracking.TAG_MODE, "max"))
    _print_confirmation(tracking.confirmation_table(client, parent, rows), parent.data.tags.get(tracking.TAG_VERDICT, ""))
    if args.out:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), args.out)
        print(f"wrote {len(rows)} trials to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ssl_tune import tracking
    from ssl_tune.export import export_run

    out = args.out or Path("exports") / args.experiment_or_run
    uri = tracking.resolve_uri(args.tracking_uri)
    try:
        export_run(uri, args.experiment_or_run, out, register=args.register)
    except LookupError as exc:
        print(f"error: {_naming_store(exc, uri)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"exported run {metrics['run_id']} (epoch {metrics['epoch']}) to {out}: backbone.pt, head.pt, spec.yaml, metrics.json")
    print(f"load it with:  ssl_tune.load_backbone({str(out)!r})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from ssl_tune import tracking

    uri = tracking.resolve_uri(args.tracking_uri)
    try:
        rows = tracking.list_searches(tracking.existing_store_client(uri))
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"searches in {uri}:")
    print(tracking.format_table(rows, [c for c in (rows[0] if rows else {}) if c != "run_id"]) if rows else "(none)")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import os
    import shutil

    from ssl_tune import tracking

    uri = tracking.resolve_uri(args.tracking_uri)
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port} (Ctrl-C to stop)", flush=True)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.execv(mlflow, [mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-tune",
        description="Hyperparameter search for self-supervised learning (Ray Tune + Optuna, tracked in MLflow).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def spec_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", type=Path, help="spec file (YAML), e.g. search_spaces/twist.yaml")
        p.add_argument("--set", action="append", default=[], metavar="A.B=VALUE",
                       help="override a spec field (value parsed as YAML); repeatable")

    prepare = sub.add_parser("prepare", help="decode the spec's data set into its cache (run and train do it when needed)",
                             description="Decode the spec's data set once, in parallel on every core, into a memory-mapped "
                             "cache (data.cache_dir, else $SSL_TUNE_CACHE_DIR, else ~/.cache/ssl-tune) that every trial "
                             "and worker on this machine shares; reuse it if it is up to date with its source files. "
                             "Optional: `ssl-tune run` and `ssl-tune train` build a missing or stale cache themselves.")
    spec_args(prepare)
    prepare.set_defaults(func=cmd_prepare)

    train = sub.add_parser("train", help="train one configuration without Ray (ranges at their defaults)",
                           description="Train one configuration of a spec in this process: fixed values as given, "
                           "every search range at its `default` (or its centre). Prints progress per epoch and "
                           "kNN / linear-probe accuracy next to the random-init baseline.")
    spec_args(train)
    train.add_argument("--out", type=Path, help="directory for checkpoint.pt, spec.json and metrics.json "
                       "(default ssl_tune_runs/train/NAME-TIME)")
    train.add_argument("--resume", type=Path, help="checkpoint.pt (or its directory) to continue from")
    train.set_defaults(func=cmd_train)

    run = sub.add_parser("run", help="search the spec's ranges with Ray Tune + Optuna, tracked in MLflow",
                         description="Search the spec's ranges: Optuna's TPE proposes values, ASHA stops weak trials "
                         "early, every trial trains with the shared trainer (DDP over resources.num_workers Ray Train "
                         "workers), and everything is logged to MLflow as one parent run with a child run per trial.")
    spec_args(run)
    run.add_argument("--name", help="name of this search (Ray experiment and MLflow parent run); default NAME-TIME")
    run.add_argument("--address", help="Ray cluster address (auto, ray://host:10001); default $RAY_ADDRESS, "
                     "else a local Ray instance sized to this machine")
    run.add_argument("--verbose", action="store_true", help="show Ray's own output instead of the compact trial table")
    run.add_argument("--tracking-uri", help="MLflow tracking URI; default the spec's mlflow.tracking_uri, else "
                     "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    run.set_defaults(func=cmd_run)

    def uri_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tracking-uri", help="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")

    resume = sub.add_parser("resume", help="continue an interrupted search where it stopped",
                            description="Continue a search stopped by Ctrl-C, SIGTERM or a dead driver: unfinished trials "
                            "resume from their latest checkpoints, the remaining samples run, finished trials are kept, "
                            "and the same MLflow parent and child runs are used.")
    resume.add_argument("experiment_or_run", help="the search's name (run --name), its parent run id, or an MLflow "
                        "experiment name with one unfinished search")
    uri_arg(resume)
    resume.add_argument("--storage-path", help="where the search keeps its Tune state, if not ./ssl_tune_runs (the spec's "
                        "storage_path); resume reads (unpickles) that state only from here")
    resume.add_argument("--address", help="Ray cluster address; default $RAY_ADDRESS, else a local Ray instance")
    resume.add_argument("--verbose", action="store_true", help="show Ray's own output instead of the compact trial table")
    resume.set_defaults(func=cmd_resume)

    results = sub.add_parser("results", help="leaderboard of a search; --out writes every trial as Parquet",
                             description="Print the trials of a search (the latest one of EXPERIMENT, or the given "
                             "parent run id), best first.")
    results.add_argument("experiment", help="MLflow experiment name or a search's run id")
    results.add_argument("--out", type=Path, help="write the table to this .parquet file")
    uri_arg(results)
    results.set_defaults(func=cmd_results)

    export = sub.add_parser("export", help="write the best trial's backbone, head, spec and metrics",
                            description="Export the checkpoint of a search's best trial (after a confirmation stage, "
                            "the confirmed winner's best seed), or of one trial run: backbone.pt "
                            "(a plain state_dict, torch.load(weights_only=True)), head.pt, spec.yaml, metrics.json. "
                            "Load it with ssl_tune.load_backbone(DIR).")
    export.add_argument("experiment_or_run", help="MLflow experiment name, search run id or trial run id")
    export.add_argument("--out", type=Path, help="output directory (default exports/EXPERIMENT_OR_RUN)")
    export.add_argument("--register", metavar="MODEL_NAME", help="also log the backbone to MLflow and register it")
    uri_arg(export)
    export.set_defaults(func=cmd_export)

    listing = sub.add_parser("list", help="the searches in the tracking store: name, start, method, trials, best, status",
                             description="List every ssl-tune search in the tracking store, newest first.")
    uri_arg(listing)
    listing.set_defaults(func=cmd_list)

    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the tracking store",
                        description="Start the MLflow UI on 127.0.0.1 against the same tracking URI as `ssl-tune run`.")
    ui.add_argument("--port", type=int, default=5000)
    uri_arg(ui)
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ssl_tune.spec import SpecError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
