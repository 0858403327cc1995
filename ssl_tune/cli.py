"""The `ssl-tune` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ssl_tune import __version__
from ssl_tune.shell import ssl_tune_command

# Exit statuses (README, "Exit status"): 0 a search that completed with at least one trial through;
# 1 an unexpected error (a traceback); 2 bad input or a failed pre-flight check, before any trial;
# 3 a search that completed but in which every trial failed; 4 a search that completed whose MLflow
# record could not be completed (the server stayed away; `resume` completes it); 5 the storage path's disk
# filled during the search (free space, then `resume`); 130 stopped by Ctrl-C or SIGTERM.
EXIT_BAD_INPUT = 2
EXIT_ALL_TRIALS_FAILED = 3
EXIT_TRACKING_INCOMPLETE = 4
EXIT_STORAGE_FULL = 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
UI_QUIET_WARNING = "ignore:starlette.middleware.wsgi is deprecated"


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
        from ssl_tune.figures import TRAINING_METRICS

        skip = {"loss", *TRAINING_METRICS}
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


def _open_data(spec, spec_path: Path, *, refresh: bool = False):
    """The spec's data set from its cache (built first if needed, rebuilt with `refresh`), with the
    cache's summary printed; None (after printing the error) when the data is not usable."""
    from ssl_tune.data.cache import open_dataset
    from ssl_tune.data.datasets import DataError

    try:
        dataset, info = open_dataset(spec.data, refresh=refresh)
    except DataError as exc:
        print(f"error: data set {spec.data.name!r} (spec {spec_path}, field data.root): {exc}", file=sys.stderr)
        return None, None
    if info is not None:
        print(info.summary())
    return dataset, info


def _describe_range(r) -> str:
    from ssl_tune.spec import Choice, IntRange, range_default

    if isinstance(r, Choice):
        text = "choice of " + ", ".join(map(str, r.values))
    elif isinstance(r, IntRange):
        text = f"int {r.low} to {r.high}" + (f" step {r.step}" if r.step != 1 else "") + (" (log)" if r.log else "")
    else:
        text = f"{r.type} {r.low:g} to {r.high:g}"
    return f"{text}; default {range_default(r)}"


def _cluster_nodes(address: str | None) -> tuple[str, list[dict]]:
    """The nodes trials would run on: the Ray cluster at `address` (or $RAY_ADDRESS), else this machine
    as a local Ray instance would see it."""

    from ssl_tune import cluster

    if address or os.environ.get("RAY_ADDRESS"):
        import ray

        where = cluster.init_ray(address, log_to_driver=False)
        try:
            return f"the Ray cluster at {where}", cluster.node_resources()
        finally:
            ray.shutdown()
    import torch

    return "this machine", [{"id": "local", "address": "this machine", "CPU": float(os.cpu_count() or 1),
                             "GPU": float(torch.cuda.device_count())}]


def _describe_backbone(spec) -> str:
    """One line: the backbone, its feature size and parameters, and what `cifar_stem: auto` chose;
    SpecError when it cannot take the data set's images (`trainers.loop.check_backbone`)."""
    from ssl_tune.data.cache import network_input
    from ssl_tune.models import is_resnet, resolve_cifar_stem
    from trainers.loop import check_backbone

    b = spec.backbone
    dim, parameters = check_backbone(spec)
    channels, size = network_input(spec.data)
    line = f"backbone: {b.name} ({parameters / 1e6:.2f}M parameters, {dim} features) on {channels} x {size} x {size} images"
    if is_resnet(b.name):
        stem = "CIFAR stem (3x3 conv, no max-pool)" if resolve_cifar_stem(b, size) else "ImageNet stem (7x7 conv, max-pool)"
        line += f"; {stem}" + (f": backbone.cifar_stem auto at {size} px" if b.cifar_stem == "auto" else "")
    return line


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a spec and print what `run` would do: ranges, trials, expected epochs, resources, fit."""
    from ssl_tune import budget, cluster, tracking
    from ssl_tune.search import startup_trials
    from ssl_tune.space import direction
    from ssl_tune.spec import SpecError
    from ssl_tune.specfile import load_spec

    spec = load_spec(args.spec, args.set)
    t, s, r = spec.training, spec.search, spec.resources
    print(f"{args.spec}: a valid spec")
    print(f"  method {' or '.join(spec.method_names())} on {spec.data.name}; {t.epochs} epochs of batch {t.batch_size}; "
          f"objective {direction(s.metric, s.mode)}")
    ranges = spec.search_ranges()
    if not ranges:
        print(f"error: {args.spec} has no search ranges, so `ssl-tune run` refuses it; `ssl-tune train` trains its one "
              "configuration", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"searched ranges ({len(ranges)}):")
    width = max(map(len, ranges))
    branches = spec.branch_ranges()
    for path, found in ranges.items():
        print(f"  {path:<{width}}  {_describe_range(found)}")
        for (of, value), sub in branches.items():
            if of == path:
                for sub_path, sub_range in sub.items():
                    print(f"  {'':<{width}}    when {value}: {sub_path} {_describe_range(sub_range)}")
    sampler = f"TPE, the first {min(startup_trials(spec), s.num_samples)} at random" if s.sampler == "tpe" else "random"
    confirming = budget.confirmation_trials(spec)
    print(f"trials: {s.num_samples} in the search ({sampler})" + (
        f", then {confirming} in the confirmation stage (the {s.confirm.top_k} best"
        f"{' and the default' if s.confirm.default else ''}, {s.confirm.seeds} seeds each)" if confirming else ""))
    full = s.num_samples * t.epochs
    if budget.rungs(spec):
        expected = s.num_samples * budget.expected_epochs_left(spec, 0)
        searched = (f"about {expected:.0f} expected with ASHA (at epochs {', '.join(map(str, budget.rungs(spec)))} "
                    f"only the best 1 in {s.reduction_factor:g} goes on), at most {full}")
    else:
        searched = f"{full} (no early stopping)"
    print(f"epochs: {searched}" + (f"; {confirming * t.epochs} in the confirmation stage" if confirming else ""))
    try:
        print(_describe_backbone(spec))
    except SpecError as exc:
        print(f"error: {args.spec}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    where, nodes = _cluster_nodes(args.address)
    chose = cluster.resolve_gpus(spec, nodes)
    per_worker = f"{r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU"
    print(f"each trial asks for: {r.num_workers} worker(s) x ({per_worker})"
          + (f" + {cluster.TRAIN_DRIVER_CPU:g} CPU for its Ray Train driver" if r.num_workers > 1 else "")
          + (f"; {chose}" if chose else ""))
    offered = ", ".join(f"{n['CPU']:g} CPU + {n['GPU']:g} GPU" for n in nodes)
    try:
        fits = cluster.check_resources(spec, nodes)
    except SpecError as exc:
        print(f"error: {args.spec}: does not fit on {where} ({offered}): {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    at_once = min(s.max_concurrent or fits, s.num_samples)
    print(f"cluster: {where} ({len(nodes)} node(s): {offered}) fits {fits} trial(s) at once; {at_once} will run at once"
          + (" (search.max_concurrent)" if s.max_concurrent and s.max_concurrent < fits else ""))
    try:
        needed = cluster.check_disk_space(spec, spec.storage_path, at_once)
    except SpecError as exc:
        print(f"error: {args.spec}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"checkpoints: {cluster.checkpoint_bytes(spec) / 2**20:,.1f} MiB each, about {needed / 2**30:,.2f} GiB on "
          f"{spec.storage_path} while {at_once} trial(s) run")
    uri = tracking.resolve_uri(spec.mlflow.tracking_uri)
    print(f"tracking: {uri}, experiment {spec.mlflow.experiment_name or spec.name!r}; Ray storage: {spec.storage_path}")
    print(f"start it with:  {ssl_tune_command('run', str(args.spec), *[f'--set={o}' for o in args.set])}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from ssl_tune.specfile import load_spec

    spec = load_spec(args.spec, args.set)
    if spec.data.name == "fashion_mnist_subset":
        print("the bundled data set (fashion_mnist_subset) ships decoded inside the package: nothing to prepare")
        return 0
    if not (args.address or os.environ.get("RAY_ADDRESS")):  # this machine, in this process
        dataset, _ = _open_data(spec, args.spec, refresh=args.refresh)
        return 0 if dataset is not None else EXIT_BAD_INPUT
    import ray

    from ssl_tune import cluster

    where = cluster.init_ray(args.address, log_to_driver=False)
    try:
        nodes = cluster.trial_nodes(spec, cluster.node_resources())
        print(f"building the data cache on {len(nodes)} node(s) of the Ray cluster at {where}", flush=True)
        cluster.prepare_data(spec, nodes, refresh=args.refresh)
    finally:
        ray.shutdown()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ssl_tune.checkpoints import CheckpointError
    from ssl_tune.spec import SpecError
    from ssl_tune.specfile import load_spec
    from ssl_tune.training import train
    from trainers.loop import DeviceOutOfMemory

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
    except DeviceOutOfMemory as exc:  # names the stage and the field to change
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except CheckpointError as exc:  # --resume names a damaged file, or the disk filled
        print(f"error: {exc}", file=sys.stderr)
        if exc.disk_full:
            return EXIT_STORAGE_FULL
        return 1 if exc.reason.startswith("cannot be written") else EXIT_BAD_INPUT
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

    # The printed commands name the tracking store when it is not the one they would find by default.
    uri = [] if outcome.tracking_uri == tracking.resolve_uri(None) else ["--tracking-uri", outcome.tracking_uri]
    where = f"MLflow: experiment {outcome.experiment!r}, parent run {outcome.parent_run_id} in {outcome.tracking_uri}"
    if outcome.interrupted:
        when = (f"in its confirmation stage, after {outcome.trials_done} finished confirmation trial(s)"
                if outcome.in_confirmation else f"after {outcome.trials_done} finished trial(s)")
        print(f"\nsearch interrupted {when}; its state and checkpoints are saved, unfinished trials are marked "
              "KILLED in MLflow")
        print(where)
        print(f"resume with:  {_resume_command(outcome.parent_run_id, outcome.tracking_uri, outcome.storage)}")
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
    print(f"browse the search:         {ssl_tune_command('ui', *uri)}")
    print(f"export the best backbone:  {ssl_tune_command('export', outcome.experiment, *uri)}")
    return 0


def _resume_command(parent_run_id: str, tracking_uri: str, storage: str) -> str:
    """`ssl-tune resume` for a search, naming the tracking store and the storage path where they are not the defaults."""
    from ssl_tune import tracking
    from ssl_tune.spec import SpecBase

    uri = [] if tracking_uri == tracking.resolve_uri(None) else ["--tracking-uri", tracking_uri]
    default_storage = str(Path(SpecBase.model_fields["storage_path"].default).resolve())
    storage_arg = [] if storage in ("", default_storage) else ["--storage-path", storage]
    return ssl_tune_command("resume", parent_run_id, *uri, *storage_arg)


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
        parent = tracking.find_parent_run(client, args.experiment_or_run)
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
    from ssl_tune.checkpoints import CheckpointError
    from ssl_tune.export import export_run

    out = args.out or Path("exports") / args.experiment_or_run
    uri = tracking.resolve_uri(args.tracking_uri)
    try:
        export_run(uri, args.experiment_or_run, out, register=args.register)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except LookupError as exc:
        print(f"error: {_naming_store(exc, uri)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"exported run {metrics['run_id']} (epoch {metrics['epoch']}) to {out}: backbone.pt, head.pt, spec.yaml, input.json, "
          "metrics.json")
    print(f"load it with:  backbone, preprocess = ssl_tune.load_backbone({str(out)!r})")
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
    import shutil

    from ssl_tune import tracking

    uri = tracking.resolve_uri(args.tracking_uri)
    try:
        tracking.existing_store_client(uri)  # MLflow would create an empty store and show nothing
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow's server imports a module Starlette deprecated: a warning per worker, not the user's to act on.
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), UI_QUIET_WARNING]))
    # One worker: a UI for one person starts faster and holds one process's memory, not four.
    os.execv(mlflow, [mlflow, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
                      "--workers", "1"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-tune",
        description="Hyperparameter search for self-supervised learning (Ray Tune + Optuna, tracked in MLflow).",
    )
    parser.add_argument("--version", action="version", version=f"ssl-tune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def spec_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", type=Path, help="spec file (YAML), e.g. search_spaces/twist.yaml")
        p.add_argument("--set", action="append", default=[], metavar="A.B=VALUE",
                       help="override a spec field (value parsed as YAML); repeatable")

    validate = sub.add_parser("validate", help="check a spec and show what `run` would do, without starting it",
                              description="Check a spec (with its --set overrides) and print what `ssl-tune run` would do: "
                              "the searched ranges, the number of trials and the epochs they are expected to train, the "
                              "resources each trial asks for and whether the cluster (--address, else this machine) "
                              "fits them. Exit 0 when the spec is valid and fits, 2 otherwise. Starts no search.")
    spec_args(validate)
    validate.add_argument("--address", help="Ray cluster to check the resources against (auto, ray://host:10001); "
                          "default $RAY_ADDRESS, else this machine")
    validate.set_defaults(func=cmd_validate)

    prepare = sub.add_parser("prepare", help="decode the spec's data set into its cache (run and train do it when needed)",
                             description="Decode the spec's data set once, in parallel on every core, into a memory-mapped "
                             "cache (data.cache_dir, else $SSL_TUNE_CACHE_DIR, else ~/.cache/ssl-tune) that every trial "
                             "and worker on a machine shares; reuse it if it is up to date with its source (directory "
                             "listings and times). With --address, on every node of that Ray cluster that can run "
                             "a trial worker. Optional: `ssl-tune run` and `resume` do it on every node before any "
                             "trial, `ssl-tune train` in its own process.")
    spec_args(prepare)
    prepare.add_argument("--address", help="build on every node of this Ray cluster (auto, HOST:PORT); default "
                         "$RAY_ADDRESS, else this machine")
    prepare.add_argument("--refresh", action="store_true", help="rebuild even if the cache looks up to date: for "
                         "image files rewritten in place under the same name, which the listings do not show")
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

    def search_arg(p: argparse.ArgumentParser, also: str) -> None:
        p.add_argument("experiment_or_run", metavar="EXPERIMENT_OR_RUN",
                       help=f"a search's name (run --name) or its parent run id, {also}")

    resume = sub.add_parser("resume", help="continue an interrupted search where it stopped",
                            description="Continue a search stopped by Ctrl-C, SIGTERM or a dead driver: unfinished trials "
                            "resume from their latest checkpoints, the remaining samples run, finished trials are kept, "
                            "and the same MLflow parent and child runs are used.")
    search_arg(resume, "or an MLflow experiment name with one unfinished search")
    uri_arg(resume)
    resume.add_argument("--storage-path", help="where the search keeps its Tune state, if not ./ssl_tune_runs (the spec's "
                        "storage_path); resume reads (unpickles) that state only from here")
    resume.add_argument("--address", help="Ray cluster address; default $RAY_ADDRESS, else a local Ray instance")
    resume.add_argument("--verbose", action="store_true", help="show Ray's own output instead of the compact trial table")
    resume.set_defaults(func=cmd_resume)

    results = sub.add_parser("results", help="leaderboard of a search; --out writes every trial as Parquet",
                             description="Print the trials of a search, best first, and its confirmation stage.")
    search_arg(results, "or an MLflow experiment name (its latest search)")
    results.add_argument("--out", type=Path, help="write the table to this .parquet file")
    uri_arg(results)
    results.set_defaults(func=cmd_results)

    export = sub.add_parser("export", help="write the best trial's backbone, head, spec and metrics",
                            description="Export the checkpoint of a search's best trial (after a confirmation stage, "
                            "the confirmed winner's best seed), or of one trial run: backbone.pt "
                            "(a plain state_dict, torch.load(weights_only=True)), head.pt, spec.yaml, input.json (what "
                            "the backbone takes: channels, size, normalisation), metrics.json. Load it with "
                            "`backbone, preprocess = ssl_tune.load_backbone(DIR)`.")
    search_arg(export, "an MLflow experiment name (its latest search), or one trial's run id")
    export.add_argument("--out", type=Path, help="output directory (default exports/EXPERIMENT_OR_RUN)")
    export.add_argument("--register", metavar="MODEL_NAME", help="also log the backbone to MLflow and register it")
    uri_arg(export)
    export.set_defaults(func=cmd_export)

    listing = sub.add_parser("list", help="the searches in the tracking store: name, start, method, trials, best, status",
                             description="List every ssl-tune search in the tracking store, newest first.")
    uri_arg(listing)
    listing.set_defaults(func=cmd_list)

    ui = sub.add_parser("ui", help="start the MLflow UI for the tracking store (on 127.0.0.1 unless --host)",
                        description="Start the MLflow UI against the same tracking URI as `ssl-tune run`.")
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only; "
                    "0.0.0.0 serves every network the machine is on, without authentication)")
    ui.add_argument("--port", type=int, default=5000, help="port to serve on (default 5000)")
    uri_arg(ui)
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ssl_tune.replay import StorageFull, TrackingIncomplete
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
    except StorageFull as exc:
        print(f"\nerror: {exc}; the search stopped. Free space there, then resume with:  "
              f"{_resume_command(exc.parent_run_id, exc.uri, exc.storage)}", file=sys.stderr)
        return EXIT_STORAGE_FULL
    except TrackingIncomplete as exc:
        print(f"\nsearch complete, tracking incomplete: {exc}.\nNothing is lost: every result and checkpoint is in "
              f"Ray Tune's files under {exc.storage}; once the server answers, resume replays them into MLflow.\n"
              f"complete the record with:  {_resume_command(exc.parent_run_id, exc.uri, exc.storage)}", file=sys.stderr)
        return EXIT_TRACKING_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
