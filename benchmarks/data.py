"""The decoded data cache against reading an ImageFolder the way it was read before, on a synthetic
folder of JPEGs that `scripts/make_image_folder.py` writes (100,000 at 96 px by default).

    python -m benchmarks data [--images 100000] [--size 96] [--folder DIR]

Measured in one run, each against its baseline:

1. decode: a cold `ssl-tune prepare` (no cache yet; listing, fingerprint, parallel decode, statistics)
   in images/s, against one pass of torchvision's `DataLoader(ImageFolder(...), num_workers=<cores>)`
   with the same Resize + CenterCrop over the same files. The JPEGs are read once before either, so
   both find them in the page cache. The DataLoader pass runs before and after; their mean is the baseline.
2. time to a trial's first training step with a warm cache (a fresh process: open the data set, the
   normaliser, the first batch of augmented views), against an in-memory loader like the one ssl-tune
   had before the cache: every file decoded in the trial's process, one after the other (once; the old
   loader decoded each file twice), then the statistics.
3. node memory with 2 concurrent single-worker trials that read the whole training split: the sum of
   what the data added to their proportional set sizes (PSS: a page shared by two processes counts half
   in each) over the size of one copy of the training split, for the mapped cache and for private
   in-memory copies.
4. training throughput (the shared trainer, TWIST, the shipped spec's network): batches streamed from
   the mapped cache (a background thread gathers each batch's rows, `data.on_device: false`, the CPU's
   default) against the same images resident as in-memory tensors, interleaved A B B A.
5. a training process's peak anonymous memory (training steps, then one evaluated epoch's evaluation),
   and 6. evaluation time per evaluated epoch over training time per epoch (the measured step time x
   the steps of an epoch): today's defaults (a 25,600-image bank, kNN in 256 x 16,384 blocks, streamed)
   against the way it was before (every training image in the bank, kNN over 1,024 test rows x the whole
   bank at once, resident), each in a fresh process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

SIZE_96 = 96


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=100_000, help="JPEGs in the synthetic folder (train and test)")
    parser.add_argument("--size", type=int, default=SIZE_96, help="pixels of the JPEGs and of the cache")
    parser.add_argument("--folder", type=Path, help="the folder to use or create (default: under the temp dir)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per throughput measurement")
    parser.add_argument("--repeats", type=int, default=2, help="A B B A pairs for the throughput")
    parser.add_argument("--batch-size", type=int, default=256, help="training batch for the throughput (the spec's)")


def image_folder_generator():
    """`scripts/make_image_folder.py` as a module, loaded once per process (its worker function is
    pickled by reference, so every caller must use the same module object)."""
    if "make_image_folder" not in sys.modules:
        spec = importlib.util.spec_from_file_location("make_image_folder",
                                                      common.REPO / "scripts" / "make_image_folder.py")
        module = sys.modules["make_image_folder"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["make_image_folder"]


def _data_section(folder: Path, size: int, cache_dir: Path):
    from ssl_tune.spec import DataSpec

    # The JPEGs are squares of `size` already: storing them larger would only upsample them.
    return DataSpec(name="imagefolder", root=folder, image_size=size, cache_size=size, cache_dir=cache_dir)


def _read_all(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*.jpg"):
        total += len(path.read_bytes())
    return total


def dataloader_pass(folder: Path, size: int) -> float:
    """Images/s of one pass of torchvision's DataLoader over both splits, every core decoding."""
    import torch
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    transform = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    count, start = 0, time.perf_counter()
    for split in ("train", "test"):
        loader = torch.utils.data.DataLoader(ImageFolder(str(folder / split), transform=transform), batch_size=256,
                                             num_workers=os.cpu_count() or 1)
        for images, _ in loader:
            count += len(images)
    return count / (time.perf_counter() - start)


# Run in a fresh process, like a trial: print seconds to the first batch of augmented views.
FIRST_STEP = """
import json, sys, time
start = time.perf_counter()
sys.path.insert(0, {repo!r})
from ssl_tune.spec import DataSpec
from ssl_tune.data.loader import Normalizer, ViewLoader
from ssl_tune.data.augment import preset_views
data = DataSpec(name="imagefolder", root={folder!r}, image_size={size}, cache_size={size}, cache_dir={cache!r})
imported = time.perf_counter()
if {old!r}:
    from benchmarks.data import decode_in_process
    dataset = decode_in_process(data)
else:
    from ssl_tune.data.cache import open_dataset
    dataset, _ = open_dataset(data, expected={expected!r})
normalizer = Normalizer(dataset.train_images, stats=dataset.channel_stats)
loader = ViewLoader(dataset.ssl_images, preset_views("byol", (0.2, 1.0)), normalizer, global_batch_size=256, seed=0)
views = next(iter(loader.epoch(0)))
print(json.dumps({{"seconds": time.perf_counter() - imported, "with_imports": time.perf_counter() - start}}))
"""


def decode_in_process(data):
    """An in-memory loader like the one ssl-tune had before the cache: every file decoded in this
    process, in order, into one tensor (the baseline of this benchmark; the old loader decoded each
    file twice, so it was slower still)."""
    import torch

    from ssl_tune.data.datasets import ImageDataset
    from ssl_tune.data.imagefolder import decode, list_folder

    listing = list_folder(Path(data.root))

    def split(s):
        return (torch.stack([torch.from_numpy(decode(f, data.image_size)[0]) for f in s.files]),
                torch.tensor(s.labels, dtype=torch.int64))

    (xtr, ytr), (xte, yte) = split(listing.train), split(listing.test)
    return ImageDataset("imagefolder", xtr, ytr, xte, yte, len(listing.classes))


def first_step_seconds(folder: Path, size: int, cache: Path, *, old: bool, expected: str | None) -> float:
    code = FIRST_STEP.format(repo=str(common.REPO), folder=str(folder), size=size, cache=str(cache), old=old,
                             expected=expected)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=common.REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


# A single-worker trial's data side: map (or copy into memory), read the whole training split as an
# epoch does, then report this process's proportional set size while the other process does the same.
RESIDENT = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from ssl_tune.spec import DataSpec
from ssl_tune.data.cache import open_dataset
data = DataSpec(name="imagefolder", root={folder!r}, image_size={size}, cache_size={size}, cache_dir={cache!r})

def pss():
    rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:"))

before = pss()  # the interpreter and libraries: not the data
dataset, info = open_dataset(data, expected={expected!r})
images = dataset.train_images
if {private!r}:  # what the in-memory loader held: the images read into this process's own memory
    import numpy, torch
    images = torch.from_numpy(numpy.fromfile(info.path / "train_images.u8", dtype=numpy.uint8).reshape(images.shape))
total = 0
for start in range(0, len(images), 4096):
    total += int(images[start:start + 4096].sum())
Path({ready!r}).write_text("ready")
while not Path({go!r}).exists():
    time.sleep(0.05)
print(json.dumps({{"pss": pss() - before}}))
"""


def resident_bytes(folder: Path, size: int, cache: Path, expected: str, *, private: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        go = Path(tmp) / "go"
        procs = []
        for i in range(2):
            code = RESIDENT.format(repo=str(common.REPO), folder=str(folder), size=size, cache=str(cache),
                                   expected=expected, private=private, ready=str(Path(tmp) / f"ready{i}"), go=str(go))
            procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                          cwd=common.REPO))
        while not all((Path(tmp) / f"ready{i}").exists() for i in range(2)):
            if any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError("a memory probe failed")
            time.sleep(0.1)
        go.write_text("go")  # both hold their data now: measure at once
        sizes = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    return {"pss_sum": sum(s["pss"] for s in sizes)}


def _twist_spec(batch_size: int, extra: list[str] | None = None):
    from ssl_tune.spec.files import load_spec

    return load_spec(common.REPO / "search_spaces" / "twist.yaml", [f"training.batch_size={batch_size}",
                                                                   *(extra or [])]).resolve()


def train_steps(trainer, steps: int) -> float:
    """Images/s of `steps` of the trainer's own steps (its loader, streamed or resident; its precision).
    The loss is read after the last step, so a GPU has finished the work timed."""
    trainer.model.train()
    batches = trainer.loader.epoch(0)
    start, seen = time.perf_counter(), 0
    try:
        for step in range(steps):
            views = next(batches)
            out = trainer.train_step(views, step / trainer.total_steps)
            seen += len(views[0])
        out.loss.item()
    finally:
        batches.close()
    return seen / (time.perf_counter() - start)


def throughput(dataset, batch_size: int, steps: int, repeats: int) -> dict[str, Any]:
    """Images/s of the trainer streaming from the mapped cache (A) and with the images resident in
    memory (B), A B B A."""
    import torch

    from ssl_tune.data.datasets import ImageDataset
    from trainers.loop import Trainer

    in_memory = ImageDataset(dataset.name, dataset.train_images.clone(), dataset.train_labels,
                             dataset.test_images.clone(), dataset.test_labels, dataset.num_classes,
                             channel_stats=dataset.channel_stats)
    trainers = {"streamed": Trainer(_twist_spec(batch_size, ["data.on_device=false"]), dataset=dataset),
                "resident": Trainer(_twist_spec(batch_size, ["data.on_device=true"]), dataset=in_memory)}
    assert trainers["streamed"].loader.stream and not trainers["resident"].loader.stream

    torch.manual_seed(0)
    train_steps(trainers["streamed"], steps), train_steps(trainers["resident"], steps)  # warm-up
    pairs = []
    for _ in range(repeats):
        a1, b1 = train_steps(trainers["streamed"], steps), train_steps(trainers["resident"], steps)
        b2, a2 = train_steps(trainers["resident"], steps), train_steps(trainers["streamed"], steps)
        pairs.append(((a1 + a2) / 2, (b1 + b2) / 2))
    return {"streamed_images_per_s": statistics.median(a for a, _ in pairs),
            "resident_images_per_s": statistics.median(b for _, b in pairs),
            "ratio": statistics.median(a / b for a, b in pairs), "pairs": pairs}


# A trial's training process in a fresh interpreter: a few training steps, then one evaluated epoch's
# evaluation; its peak anonymous memory (sampled) and the times. `before` runs the way it was.
EVALUATION = """
import json, re, sys, threading, time
sys.path.insert(0, {repo!r})
import torch
from benchmarks.data import _twist_spec, train_steps
from ssl_tune import evaluation
from ssl_tune.spec import DataSpec
from ssl_tune.data.cache import open_dataset
from trainers.loop import Reporter, Trainer

def anon():
    return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], anon())
        time.sleep(0.01)

data = DataSpec(name="imagefolder", root={folder!r}, image_size={size}, cache_size={size}, cache_dir={cache!r})
dataset, _ = open_dataset(data, expected={expected!r})
if {before!r}:
    evaluation.KNN_CHUNK = (1024, 1 << 40)
    extra = ["evaluation.bank_size=null", "data.on_device=true"]
else:
    extra = []
trainer = Trainer(_twist_spec({batch_size}, extra), dataset=dataset)
base = anon()
threading.Thread(target=sample, daemon=True).start()
rate = train_steps(trainer, {steps})
start = time.perf_counter()
metrics = trainer.evaluate(Reporter(), last=False)
eval_s = time.perf_counter() - start
time.sleep(0.05)
print(json.dumps({{"images_per_s": rate, "epoch_s": trainer.loader.steps_per_epoch * {batch_size} / rate,
                  "eval_s": eval_s, "anon_base": base, "anon_peak": peak[0], "knn_top1": metrics["knn_top1"],
                  "bank": len(trainer.bank) if trainer.bank is not None else len(dataset.train_images)}}))
"""


def evaluation_run(folder: Path, size: int, cache: Path, expected: str, *, before: bool, batch_size: int,
                   steps: int) -> dict[str, Any]:
    code = EVALUATION.format(repo=str(common.REPO), folder=str(folder), size=size, cache=str(cache),
                             expected=expected, before=before, batch_size=batch_size, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=common.REPO)
    if out.returncode:
        raise RuntimeError(f"the evaluation probe failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["ratio"] = result["eval_s"] / result["epoch_s"]
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ssl_tune.data.cache import open_dataset

    size = args.size
    folder = args.folder or Path(tempfile.gettempdir()) / f"ssl-tune-bench-imagefolder-{args.images}-{size}"
    generated_s = None
    if not (folder / "test").is_dir():
        print(f"writing {args.images:,} JPEGs to {folder}", flush=True)
        start = time.perf_counter()
        image_folder_generator().make_image_folder(folder, images=args.images, size=size)
        generated_s = time.perf_counter() - start
    jpeg_bytes = _read_all(folder)  # into the page cache: both decoders read warm files
    work = Path(tempfile.mkdtemp(prefix="ssl-tune-bench-cache-"))
    try:
        print("1. DataLoader pass", flush=True)
        before = dataloader_pass(folder, size)
        print(f"   {before:,.0f} img/s; cold prepare", flush=True)
        start = time.perf_counter()
        dataset, info = open_dataset(_data_section(folder, size, work / "cache"))
        prepare_s = time.perf_counter() - start
        if info is None:  # (an image folder always has a cache)
            raise SystemExit(f"data: no cache was built for {folder}")
        images = sum(s["shape"][0] for s in info.manifest["splits"].values())
        prepare_rate = images / prepare_s
        print(f"   {prepare_rate:,.0f} img/s; DataLoader pass again", flush=True)
        after = dataloader_pass(folder, size)
        expected = info.manifest["fingerprint"]
        cache_bytes = sum((info.path / s["images"]).stat().st_size for s in info.manifest["splits"].values())
        train_bytes = (info.path / "train_images.u8").stat().st_size

        print("2. first step: cache (with the driver's fingerprint, and with its own walk), then the old loader",
              flush=True)
        first_cache = first_step_seconds(folder, size, work / "cache", old=False, expected=expected)
        first_walk = first_step_seconds(folder, size, work / "cache", old=False, expected=None)
        first_old = first_step_seconds(folder, size, work / "cache", old=True, expected=None)
        print(f"   {first_cache:.2f} s / {first_walk:.2f} s / {first_old:.1f} s", flush=True)

        print("3. memory of 2 concurrent trials", flush=True)
        shared = resident_bytes(folder, size, work / "cache", expected, private=False)
        private = resident_bytes(folder, size, work / "cache", expected, private=True)

        print("4. training throughput, streamed and resident", flush=True)
        train = throughput(dataset, args.batch_size, args.steps, args.repeats)

        print("5-6. a training process's memory and its evaluation time, before and now", flush=True)
        evaluations = {name: evaluation_run(folder, size, work / "cache", expected, before=name == "before",
                                            batch_size=args.batch_size, steps=args.steps)
                       for name in ("before", "now")}
        for name, e in evaluations.items():
            print(f"   {name}: evaluation {e['eval_s']:.1f} s / epoch {e['epoch_s']:.1f} s = {e['ratio']:.3f}; "
                  f"anonymous memory {e['anon_base'] / 2**20:,.0f} -> {e['anon_peak'] / 2**20:,.0f} MiB", flush=True)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    baseline = (before + after) / 2
    return {
        "images": images, "size": size, "folder_jpeg_mib": jpeg_bytes / 2**20, "generated_s": generated_s,
        "cache_gib": cache_bytes / 2**30, "train_split_gib": train_bytes / 2**30,
        "decode": {"prepare_s": prepare_s, "prepare_images_per_s": prepare_rate, "dataloader_images_per_s": [before, after],
                   "ratio": prepare_rate / baseline},
        "first_step": {"cache_s": first_cache, "cache_with_walk_s": first_walk, "in_memory_loader_s": first_old},
        "memory": {"mapped_pss_over_one_copy": shared["pss_sum"] / train_bytes,
                   "in_memory_pss_over_one_copy": private["pss_sum"] / train_bytes,
                   "mapped": shared, "in_memory": private},
        "throughput": train,
        "evaluation": evaluations,
    }


def report(result: dict[str, Any], figures: str) -> str:
    d, f, m, t = result["decode"], result["first_step"], result["memory"], result["throughput"]
    return "\n".join([
        f"{result['images']:,} JPEGs at {result['size']} px ({result['folder_jpeg_mib']:.0f} MiB); the cache holds "
        f"{result['cache_gib']:.2f} GiB (training split {result['train_split_gib']:.2f} GiB).", "",
        "| measure | cache | baseline | ratio | goal |", "|---|---|---|---|---|",
        f"| decode, images/s (cold `prepare` vs DataLoader over ImageFolder, all cores) | {d['prepare_images_per_s']:,.0f} "
        f"| {statistics.mean(d['dataloader_images_per_s']):,.0f} | {d['ratio']:.2f} | >= 1.0 |",
        f"| time to a trial's first step, warm (s) | {f['cache_s']:.2f} ({f['cache_with_walk_s']:.2f} with its own "
        f"walk of the folder) | {f['in_memory_loader_s']:.1f} (every file decoded once, in the trial) | "
        f"{f['cache_s'] / f['in_memory_loader_s']:.4f} | < 1 s |",
        f"| node memory, 2 concurrent trials (the data's share of their PSS / one copy of the training split) | "
        f"{m['mapped_pss_over_one_copy']:.2f} | {m['in_memory_pss_over_one_copy']:.2f} (private copies) | "
        f"{m['mapped_pss_over_one_copy'] / m['in_memory_pss_over_one_copy']:.2f} | about one copy |",
        f"| training images/s (trainer, TWIST spec) | {t['streamed_images_per_s']:,.0f} (streamed from the cache) | "
        f"{t['resident_images_per_s']:,.0f} (resident in memory) | {t['ratio']:.3f} | >= 0.97 |",
        *_evaluation_rows(result),
    ])


def _evaluation_rows(result: dict[str, Any]) -> list[str]:
    if "evaluation" not in result:
        return []
    now, before = result["evaluation"]["now"], result["evaluation"]["before"]

    def growth(e: dict[str, Any]) -> float:
        return (e["anon_peak"] - e["anon_base"]) / 2**20

    return [
        f"| a training process's anonymous memory beyond the trainer's, peak over steps + an evaluation (MiB) | "
        f"{growth(now):,.0f} (bank {now['bank']:,}) | {growth(before):,.0f} (before: bank {before['bank']:,}, kNN over "
        f"the whole bank) | {growth(now) / growth(before):.2f} | O(batch) |",
        f"| evaluation time per evaluated epoch / training time per epoch | {now['ratio']:.3f} | {before['ratio']:.3f} "
        f"(before) | {now['ratio'] / before['ratio']:.2f} | <= 0.1 |",
    ]
