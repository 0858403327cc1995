"""`ssl-tune validate`: what `ssl-tune run` would do with a spec, printed without starting anything."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ssl_tune.report.shell import ssl_tune_command
from ssl_tune.spec import SpecBase, SpecError
from ssl_tune.storage_path import StoragePath


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
    return "this machine", cluster.local_nodes()


def _describe_backbone(spec) -> str:
    """One line: the backbone, its feature size and parameters, and what `cifar_stem: auto` chose;
    SpecError when it cannot take the data set's images (`trainers.build.check_backbone`)."""
    from ssl_tune.data.cache import network_input
    from ssl_tune.models import is_resnet, resolve_cifar_stem
    from trainers.build import check_backbone

    b = spec.backbone
    dim, parameters = check_backbone(spec)
    channels, size = network_input(spec.data)
    line = f"backbone: {b.name} ({parameters / 1e6:.2f}M parameters, {dim} features) on {channels} x {size} x {size} images"
    if is_resnet(b.name):
        stem = "CIFAR stem (3x3 conv, no max-pool)" if resolve_cifar_stem(b, size) else "ImageNet stem (7x7 conv, max-pool)"
        line += f"; {stem}" + (f": backbone.cifar_stem auto at {size} px" if b.cifar_stem == "auto" else "")
    return line


def _setting(spec: SpecBase) -> str:
    """The fidelity of a spec's trials: epochs, images, image size and backbone."""
    d = spec.data
    images = ("all training images" if d.subset is None else
              f"{d.subset:g} of the training images" if isinstance(d.subset, float) else f"{d.subset} training images")
    size = f", {d.image_size} px" if d.image_size else ""
    return f"{spec.training.epochs} epochs a trial, {images}{size}, backbone {spec.backbone.name}"


def _print_search(spec: SpecBase, spec_path: str | Path) -> None:
    """The searched ranges, the trials of each stage and their budgets."""
    from ssl_tune.searching import budget
    from ssl_tune.searching.algorithms import startup_trials

    t, s = spec.training, spec.search
    ranges = spec.search_ranges()
    if not ranges:
        raise SpecError(f"{spec_path} has no search ranges, so `ssl-tune run` refuses it; `ssl-tune train` trains its "
                        "one configuration")
    print(f"searched ranges ({len(ranges)}):")
    width = max(map(len, ranges))
    branches = spec.branch_ranges()
    for path, found in ranges.items():
        print(f"  {path:<{width}}  {_describe_range(found)}")
        for (of, value), sub in branches.items():
            if of == path:
                for sub_path, sub_range in sub.items():
                    print(f"  {'':<{width}}    when {value}: {sub_path} {_describe_range(sub_range)}")
    modelled = {"tpe": "TPE", "gp": "a Gaussian process", "cmaes": "CMA-ES"}.get(s.sampler)
    sampler = (f"{modelled}, the first {min(startup_trials(spec), s.num_samples)} at random" if modelled
               else {"qmc": "quasi-random Sobol points", "random": "random"}[s.sampler])
    confirming = budget.confirmation_trials(spec)
    c = s.confirm
    seeds = (f"raced on {c.min_seeds} to {c.seeds} seeds, one more a round, fewer when decided early" if c.racing
             else f"{c.seeds} seeds each")
    print(f"trials: {s.num_samples} in the search ({sampler})" + (
        f", then {'at most ' if c.racing else ''}{confirming} in the confirmation stage (the {c.top_k} best"
        f"{' and the default' if c.default else ''}, {seeds}"
        f"{'; finished runs of the same setting in the tracking store are reused' if c.reuse else ''})"
        if confirming else ""))
    full = s.num_samples * t.epochs
    if budget.rungs(spec):
        expected = s.num_samples * budget.expected_epochs_left(spec, 0)
        searched = (f"about {expected:.0f} epochs expected with ASHA (at epochs {', '.join(map(str, budget.rungs(spec)))} "
                    f"only the best 1 in {s.reduction_factor:g} goes on), at most {full}")
    else:
        searched = f"{full} epochs (no early stopping)"
    print(f"search budget: {searched}; {_setting(spec)}")
    if confirming:
        confirm_spec = spec.confirmation_spec()
        overridden = " (search.confirm.overrides)" if s.confirm.overrides else ""
        print(f"confirmation budget: {'at most ' if c.racing else ''}{confirming} x {confirm_spec.training.epochs} = "
              f"{budget.confirmation_epochs(spec)} "
              f"epochs; {_setting(confirm_spec)}{overridden}")
    if s.warm_start:
        print(f"warm start from: {', '.join(s.warm_start)} (read from the tracking store when the search starts)")


def _print_resources(spec: SpecBase, spec_path: str | Path, address: str | None) -> None:
    """The backbone, what a trial asks for, how many fit at once, and the disk their checkpoints take."""
    from ssl_tune import cluster, storage_checks

    s, r = spec.search, spec.resources
    try:
        print(_describe_backbone(spec))
    except SpecError as exc:
        raise SpecError(f"{spec_path}: {exc}") from None
    where, nodes = _cluster_nodes(address)
    chose = cluster.resolve_gpus(spec, nodes)
    per_worker = f"{r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU"
    print(f"each trial asks for: {r.num_workers} worker(s) x ({per_worker})"
          + (f" + {cluster.TRAIN_DRIVER_CPU:g} CPU for its Ray Train driver" if r.num_workers > 1 else "")
          + (f"; {chose}" if chose else ""))
    offered = ", ".join(f"{n['CPU']:g} CPU + {n['GPU']:g} GPU" for n in nodes)
    try:
        fits = cluster.check_resources(spec, nodes)
    except SpecError as exc:
        raise SpecError(f"{spec_path}: does not fit on {where} ({offered}): {exc}") from None
    at_once = cluster.trials_at_once(spec, fits)
    print(f"cluster: {where} ({len(nodes)} node(s): {offered}) fits {fits} trial(s) at once; {at_once} will run at once"
          + (" (search.max_concurrent)" if s.max_concurrent and s.max_concurrent < fits else ""))
    try:
        needed = storage_checks.check_disk_space(spec, StoragePath.of(spec.storage_path), at_once)
    except SpecError as exc:
        raise SpecError(f"{spec_path}: {exc}") from None
    print(f"checkpoints: {storage_checks.checkpoint_bytes(spec) / 2**20:,.1f} MiB each, about {needed / 2**30:,.2f} GiB on "
          f"{spec.storage_path} while {at_once} trial(s) run")


def print_plan(spec: SpecBase, spec_path: str | Path, overrides: Sequence[str], address: str | None) -> None:
    """Print what `ssl-tune run` would do with `spec`: ranges, trials, expected epochs, backbone, resources, fit,
    disk, tracking. Raises SpecError (exit 2) for a spec `run` would refuse."""
    from ssl_tune import tracking
    from ssl_tune.searching.space import direction

    t, s = spec.training, spec.search
    print(f"{spec_path}: a valid spec")
    print(f"  method {' or '.join(spec.method_names())} on {spec.data.name}; {t.epochs} epochs of batch {t.batch_size}; "
          f"objective {direction(s.metric, s.mode)}")
    _print_search(spec, spec_path)
    _print_resources(spec, spec_path, address)
    uri = tracking.resolve_uri(spec.mlflow.tracking_uri)
    print(f"tracking: {uri}, experiment {spec.mlflow.experiment_name or spec.name!r}; Ray storage: {spec.storage_path}")
    print(f"start it with:  {ssl_tune_command('run', str(spec_path), *[f'--set={o}' for o in overrides])}")
