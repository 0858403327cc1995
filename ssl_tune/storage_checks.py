"""The storage path, checked before any trial: every node reaches an object store (`check_object_storage`), and
a local disk holds the checkpoints of the trials that run at once (`check_disk_space`, from `checkpoint_bytes`).

A failed check is the user's to fix: it raises `SpecError` (exit 2) naming the field.
"""

from __future__ import annotations

from typing import Any

from ssl_tune.spec import SpecBase, SpecError
from ssl_tune.storage_path import StoragePath


def check_object_storage(storage: StoragePath, nodes: list[dict[str, Any]], ray_address: str) -> None:
    """A storage URI (s3://, gs://, ...) must take a write from the driver and be read back from every
    node, through pyarrow's file systems as Ray uses them; else `SpecError` naming what failed."""
    import uuid

    import pyarrow.fs

    marker = str(storage / f".ssl-tune-visible-{uuid.uuid4().hex}")
    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(marker)
        filesystem.create_dir(path.rpartition("/")[0], recursive=True)
        with filesystem.open_output_stream(path) as f:
            f.write(b"written by the ssl-tune driver to check that every node reaches this storage\n")
    except Exception as exc:  # bucket, credentials, endpoint: pyarrow says which
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise SpecError(f"storage_path: {storage} cannot be written from the driver ({first}); check the bucket, the "
                        "credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and the endpoint (AWS_ENDPOINT_URL)") from None
    try:
        if ray_address == "local" and len(nodes) <= 1:
            return
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        @ray.remote(num_cpus=0)
        def reads(uri: str) -> str:
            try:
                fs, inner = pyarrow.fs.FileSystem.from_uri(uri)
                return "" if fs.get_file_info(inner).type == pyarrow.fs.FileType.File else "not found"
            except Exception as exc:
                return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"

        seen = [(n, reads.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["id"], soft=False)).remote(marker))
                for n in nodes]
        answers = [(n, ray.get(ref, timeout=120)) for n, ref in seen]
        blind = [f"{n['address']} ({problem})" for n, problem in answers if problem]
        if blind:
            raise SpecError(f"storage_path: {storage} is not reachable from node(s) {', '.join(blind)}, where trials "
                            "would write their checkpoints; give every node the same credentials and endpoint")
    finally:
        filesystem.delete_file(path)


# Per-parameter state an optimizer keeps beside the weights: momentum (SGD, LARS) or two moments (AdamW).
OPTIMIZER_COPIES = {"sgd": 1, "lars": 1, "adamw": 2}


def checkpoint_bytes(spec: SpecBase) -> int:
    """Estimated size of one trial checkpoint: the model's parameters and buffers and the optimizer's
    per-parameter state, in fp32, for the largest configuration the spec's ranges allow (each
    numeric range at its upper bound, each method of a choice over methods).

    ResNet-50 with LARS (computed here): 190 MiB with the default 512-256 projector, 276 MiB with a
    2048-2048 one; AdamW's two moments make it half as large again. The bundled TWIST spec: 3.5 MiB
    (a written checkpoint: 3.48 MiB).
    """
    import torch

    from ssl_tune.spec import Choice, range_default
    from trainers.build import build_method

    ranges = spec.search_ranges()
    largest = {path: (r.high if hasattr(r, "high") else range_default(r)) for path, r in ranges.items()}
    method_choice = ranges.get("method.name")
    methods = [str(v) for v in method_choice.values] if isinstance(method_choice, Choice) else [None]
    optimizer_choice = ranges.get("optimizer.name")
    optimizers = [str(v) for v in optimizer_choice.values] if isinstance(optimizer_choice, Choice) else \
        [str(spec.optimizer.name)]
    copies = 1 + max(OPTIMIZER_COPIES.get(o, 2) for o in optimizers)
    biggest = 0
    for method in methods:
        values = {**largest, **({"method.name": method} if method else {})}
        try:
            resolved = spec.resolve(values)
        except Exception:  # bounds that do not combine: the default configuration is a fair estimate
            resolved = spec.resolve({"method.name": method} if method else {})
        with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
            model = build_method(resolved, device=torch.device("cpu"))
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        biggest = max(biggest, weights + (copies - 1) * trainable)
    return biggest


def check_disk_space(spec: SpecBase, storage: StoragePath, concurrent: int) -> int:
    """Before any trial: the storage path must hold the checkpoints of the trials that run at once
    (`checkpoint_bytes` x the checkpoints kept, plus the one being written, x `concurrent`), else
    SpecError naming the path, its free space and the estimate. Returns the estimate (bytes).
    Object storage (s3://, gs://) is not measured."""
    import shutil

    from ssl_tune.trials.runner import CHECKPOINTS_KEPT

    each = checkpoint_bytes(spec)
    needed = each * (CHECKPOINTS_KEPT + 1) * concurrent
    if storage.local is None:
        return needed
    existing = storage.local
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise SpecError(f"storage_path: {storage} has {free / 2**30:,.2f} GiB free, and {concurrent} trial(s) at once need "
                        f"about {needed / 2**30:,.2f} GiB for their checkpoints ({CHECKPOINTS_KEPT} kept + 1 being "
                        f"written, {each / 2**20:,.1f} MiB each); free space there, point storage_path "
                        "at a larger disk, or lower search.max_concurrent")
    return needed
