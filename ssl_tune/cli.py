"""The `ssl-tune` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ssl_tune import __version__, process_env

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


def cmd_validate(args: argparse.Namespace) -> int:
    from ssl_tune.report.preview import print_plan
    from ssl_tune.spec.files import load_spec

    print_plan(load_spec(args.spec, args.set), args.spec, args.set, args.address)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from ssl_tune.spec.files import load_spec

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
    from ssl_tune.trials.checkpoints import CheckpointError
    from ssl_tune.spec import SpecError
    from ssl_tune.spec.files import load_spec
    from ssl_tune.training import ConsoleReporter, summary, train
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
    print(summary(result, time.perf_counter() - started, out_dir))
    if result.status == "diverged":
        print(f"error: training diverged: {result.message}; the last good checkpoint is in {out_dir}", file=sys.stderr)
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ssl_tune import api

    found = api.search(args.spec, overrides=args.set, name=args.name, tracking_uri=args.tracking_uri,
                       address=args.address, verbose=args.verbose)
    return _report_outcome(found.outcome)


def cmd_resume(args: argparse.Namespace) -> int:
    from ssl_tune import api

    found = api.resume(args.experiment_or_run, tracking_uri=args.tracking_uri, address=args.address,
                       storage_path=args.storage_path, verbose=args.verbose)
    return _report_outcome(found.outcome)


def _report_outcome(outcome) -> int:
    from ssl_tune import tracking
    from ssl_tune.report import summary
    from ssl_tune.searching.folder import resume_command

    # The printed commands name the tracking store when it is not the one they would find by default.
    uri = [] if outcome.tracking_uri == tracking.resolve_uri(None) else ["--tracking-uri", outcome.tracking_uri]
    where = f"MLflow: experiment {outcome.experiment!r}, parent run {outcome.parent_run_id} in {outcome.tracking_uri}"
    if outcome.interrupted:
        when = (f"in its confirmation stage, after {outcome.trials_done} finished confirmation trial(s)"
                if outcome.in_confirmation else f"after {outcome.trials_done} finished trial(s)")
        print(f"\nsearch interrupted {when}; its state and checkpoints are saved, unfinished trials are marked "
              "KILLED in MLflow")
        print(where)
        print(f"resume with:  {resume_command(outcome.parent_run_id, outcome.tracking_uri, outcome.storage)}")
        return EXIT_INTERRUPTED
    print(f"\nsearch finished: {len(outcome.rows)} trials, objective {outcome.metric} ({outcome.mode})")
    summary.print_trials(outcome.rows, outcome.mode, outcome.confirmation, outcome.verdict)
    print(f"\n{where}")
    if outcome.all_failed:
        print(f"error: every trial failed; the reasons are in the table above and in each trial run's "
              f"{tracking.TAG_ERROR} tag (the parent run is marked FAILED)", file=sys.stderr)
        return EXIT_ALL_TRIALS_FAILED
    summary.print_next_steps(outcome, uri)
    return 0


def _naming_store(exc: Exception, uri: str) -> str:
    """An error of a read-only command, with the tracking store it looked in."""
    return str(exc) if uri in str(exc) else f"{exc} (tracking store {uri})"


def cmd_results(args: argparse.Namespace) -> int:
    from ssl_tune import api
    from ssl_tune.report import summary

    try:
        found = api.open_search(args.experiment_or_run, args.tracking_uri)
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    rows = found.trials()
    summary.print_trials(rows, found.mode, found.confirmed(rows), found.verdict)
    if args.out:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), args.out)
        print(f"wrote {len(rows)} trials to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ssl_tune import tracking
    from ssl_tune.trials.checkpoints import CheckpointError
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
    process_env.set_defaults(process_env.UI_DEFAULTS)
    # MLflow's server imports a module Starlette deprecated: a warning per worker, not the user's to act on.
    process_env.append_warning_filter(UI_QUIET_WARNING)
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
    from ssl_tune.searching.replay import StorageFull, TrackingIncomplete
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
        from ssl_tune.searching.folder import resume_command

        print(f"\nerror: {exc}; the search stopped. Free space there, then resume with:  "
              f"{resume_command(exc.parent_run_id, exc.uri, exc.storage)}", file=sys.stderr)
        return EXIT_STORAGE_FULL
    except TrackingIncomplete as exc:
        from ssl_tune.searching.folder import resume_command

        print(f"\nsearch complete, tracking incomplete: {exc}.\nNothing is lost: every result and checkpoint is in "
              f"Ray Tune's files under {exc.storage}; once the server answers, resume replays them into MLflow.\n"
              f"complete the record with:  {resume_command(exc.parent_run_id, exc.uri, exc.storage)}", file=sys.stderr)
        return EXIT_TRACKING_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
