"""The decoded data cache: built once, reused, rebuilt when its source changes, built by one process
when two need it at once, and real folders' odd files handled; `ssl-tune prepare` and `ssl-tune train`
on a generated ImageFolder."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from benchmarks.data import image_folder_generator
from ssl_tune.cli import main
from ssl_tune.data.cache import cache_path, open_dataset
from ssl_tune.data.loader import channel_stats
from ssl_tune.data.datasets import DataError
from ssl_tune.spec.files import spec_from_dict
from tests.conftest import ROOT, tiny_spec_dict

make_image_folder = image_folder_generator()  # scripts/make_image_folder.py


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds the tensor's data (from /proc/self/maps), if any."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 else None
    return None


def data_section(root: Path, cache: Path, **extra):
    return spec_from_dict(tiny_spec_dict(data={"name": "imagefolder", "root": str(root), "image_size": 16,
                                               "cache_dir": str(cache), **extra})).data


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder.make_image_folder(tmp_path_factory.mktemp("images") / "f", images=60, size=24, classes=3)


def test_cache_is_built_once_then_mapped_and_equals_a_direct_decode(folder, tmp_path):
    from ssl_tune.data.imagefolder import decode

    data = data_section(folder, tmp_path / "cache")
    first, info = open_dataset(data)
    assert info.built and info.path == cache_path(data) and info.path.parent == tmp_path / "cache"
    # Stored at 19 px (1.15 x 16, data.cache_size's default), seen by the network at 16.
    assert first.train_images.shape == (54, 3, 19, 19) and first.test_images.shape == (6, 3, 19, 19)
    assert first.image_size == 16 and first.train_aspects.tolist() == [1.0] * 54
    assert first.train_images.dtype == torch.uint8 and first.num_classes == 3
    assert torch.bincount(first.train_labels).tolist() == [18, 18, 18]
    # Row i is file i of torchvision's ImageFolder order, the whole picture resized.
    from torchvision.datasets import ImageFolder

    files = ImageFolder(str(folder / "train")).samples
    assert torch.equal(first.train_images[7], torch.from_numpy(decode(files[7][0], 19)[0]))
    mean, std = info.manifest["mean"], info.manifest["std"]
    expected_mean = first.train_images.float().div(255).mean(dim=(0, 2, 3))
    assert torch.allclose(torch.tensor(mean, dtype=torch.float32), expected_mean, atol=1e-5)
    assert first.channel_stats == (mean, std)

    before = (info.path / "train_images.u8").stat().st_mtime_ns
    again, info2 = open_dataset(data)
    assert not info2.built and (info2.path / "train_images.u8").stat().st_mtime_ns == before
    assert torch.equal(again.train_images, first.train_images)
    assert mapped_file(again.train_images) == str(info.path / "train_images.u8")  # a memory map, not a copy


def test_a_file_added_or_removed_rebuilds_the_cache_and_refresh_catches_one_edited_in_place(folder, tmp_path):
    import shutil

    data = data_section(folder, tmp_path / "cache")
    _, info = open_dataset(data)
    some_file = next((folder / "test").rglob("*.jpg"))
    stat = some_file.stat()
    extra = some_file.with_name("added.jpg")
    try:
        # Edited in place (same name, new time): directory listings do not show it; --refresh does.
        os.utime(some_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert not open_dataset(data)[1].built
        assert open_dataset(data, refresh=True)[1].built
        shutil.copy(some_file, extra)  # added: its directory's listing (and time) changed
        _, rebuilt = open_dataset(data, stream=sys.stderr)
        assert rebuilt.built and rebuilt.manifest["fingerprint"] != info.manifest["fingerprint"]
        assert not open_dataset(data)[1].built
        extra.unlink()  # removed
        assert open_dataset(data)[1].built
    finally:
        os.utime(some_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        extra.unlink(missing_ok=True)
    with pytest.raises(DataError, match="is stale: its source changed on this node; trials do not decode"):
        os.utime(some_file.parent, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        open_dataset(data, build=False)
    assert not list(tmp_path.glob("cache/*.tmp-*")) and not list(tmp_path.glob("cache/*.old-*"))


def test_two_processes_needing_the_cache_at_once_build_it_once(folder, tmp_path):
    cache = tmp_path / "cache"
    code = f"""
import sys, json
from ssl_tune.data.cache import open_dataset
from ssl_tune.spec.files import spec_from_dict
from tests.conftest import tiny_spec_dict
data = spec_from_dict(tiny_spec_dict(data={{"name": "imagefolder", "root": {str(folder)!r}, "image_size": 16,
                                          "cache_dir": {str(cache)!r}}})).data
dataset, info = open_dataset(data)
print(json.dumps({{"built": info.built, "sum": int(dataset.train_images.sum())}}))
"""
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["built"] for r in results) == [False, True], outs  # one built, the other waited and mapped
    assert results[0]["sum"] == results[1]["sum"]


def test_a_killed_build_leaves_nothing_that_is_trusted(folder, tmp_path):
    data = data_section(folder, tmp_path / "cache")
    path = cache_path(data)
    path.parent.mkdir(parents=True)
    half = path.with_name(path.name + ".tmp-deadbeef")  # what a build killed midway leaves
    half.mkdir()
    (half / "train_images.u8").write_bytes(b"\0" * 100)
    path.mkdir()  # and a final directory without its manifest (written last) is not a cache either
    (path / "train_images.u8").write_bytes(b"\0" * 100)
    _, info = open_dataset(data)
    assert info.built and not half.exists() and (path / "manifest.json").exists()


def test_messy_folder_is_converted_and_non_images_ignored(tmp_path):
    root = make_image_folder.make_image_folder(tmp_path / "messy", images=30, size=20, classes=3, messy=True)
    dataset, info = open_dataset(data_section(root, tmp_path / "cache"))
    # 27 JPEGs in train + grey, palette, RGBA, CMYK and 16-bit images; README.txt is not counted.
    assert dataset.train_images.shape == (32, 3, 19, 19) and info.skipped == 0
    from torchvision.datasets import ImageFolder

    files = [Path(f).name for f, _ in ImageFolder(str(root / "train")).samples]
    sixteen = dataset.train_images[files.index("sixteen_bit.png")]
    grey = dataset.train_images[files.index("grey.png")]
    assert torch.equal(sixteen, grey)  # 16-bit scaled to 8 bits, not clipped to white
    assert sixteen[0].float().mean() < 200


def test_corrupt_image_stops_the_build_naming_it_unless_skipped(tmp_path, capsys):
    root = make_image_folder.make_image_folder(tmp_path / "bad", images=30, size=20, classes=3, corrupt=True)
    with pytest.raises(DataError, match=r"class_00/truncated\.jpg: cannot decode this image .*data\.skip_corrupt"):
        open_dataset(data_section(root, tmp_path / "cache"))
    assert not list((tmp_path / "cache").glob("imagefolder-*/manifest.json"))  # nothing half-written is kept
    dataset, info = open_dataset(data_section(root, tmp_path / "cache", skip_corrupt=True))
    assert info.skipped == 1 and info.manifest["skipped"][0][0].endswith("truncated.jpg")
    assert dataset.train_images.shape[0] == 27 and len(dataset.train_labels) == 27
    assert "skipped 1 corrupt file(s)" in capsys.readouterr().err


def test_empty_class_mismatched_classes_and_unreadable_root_are_one_line_errors(folder, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    (root / "train" / "class_09").mkdir()
    with pytest.raises(DataError, match=r"copy/train: Found no valid file for the classes class_09$"):
        open_dataset(data_section(root, tmp_path / "cache"))
    (root / "train" / "class_09" / "a.jpg").write_bytes((folder / "train" / "class_00" / "000000.jpg").read_bytes())
    with pytest.raises(DataError, match=r"train/ and test/ have different classes \(only in one: class_09\)"):
        open_dataset(data_section(root, tmp_path / "cache"))
    if os.geteuid() != 0:  # root reads everything
        root.chmod(0)
        try:
            with pytest.raises(DataError, match="not readable"):
                open_dataset(data_section(root, tmp_path / "cache"))
        finally:
            root.chmod(0o755)


def test_channel_stats_match_torch_on_the_whole_tensor():
    from ssl_tune.data.loader import channel_histogram, stats_from_histogram

    images = torch.randint(0, 256, (50, 3, 5, 5), dtype=torch.uint8)
    mean, std = channel_stats(images)
    assert (mean, std) == stats_from_histogram(channel_histogram(images, chunk=7))  # chunks add up
    x = images.float() / 255
    assert np.allclose(mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-6)
    assert np.allclose(std, x.std(dim=(0, 2, 3)).tolist(), atol=1e-6)


@pytest.mark.slow
def test_prepare_then_train_on_a_generated_folder(folder, tmp_path, capsys):
    raw = tiny_spec_dict(data={"name": "imagefolder", "root": str(folder), "image_size": 16,
                               "cache_dir": str(tmp_path / "cache")},
                         training={"epochs": 1, "batch_size": 16, "seed": 0})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    assert main(["prepare", str(tmp_path / "spec.yaml")]) == 0
    out = capsys.readouterr()
    assert "data cache " in out.out and "imagefolder 3x19x19 (whole pictures, seen at 16 px), train 54, test 6" in out.out
    assert "built in" in out.out
    started = time.perf_counter()
    assert main(["train", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "reused (up to date with its source)" in out and "finished after 1 epochs" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["cache"] == str(cache_path(spec_from_dict(raw).data)) and metrics["data"]["skipped"] == 0
    assert time.perf_counter() - started < 120


def test_the_cache_keeps_the_whole_picture_and_evaluation_sees_its_centre(tmp_path):
    from PIL import Image
    from torchvision.transforms import v2

    from ssl_tune.data.augment import centre_view
    from ssl_tune.data.imagefolder import decode

    picture = np.zeros((64, 128, 3), dtype=np.uint8)  # 2:1, a red band at its left edge, the rest blue
    picture[:, :20, 0], picture[:, 20:, 2] = 255, 255
    path = tmp_path / "wide.png"
    Image.fromarray(picture).save(path)
    stored, aspect = decode(str(path), 37)
    assert stored.shape == (3, 37, 37) and aspect == 2.0
    assert stored[0, :, :4].min() > 200 and stored[2, :, 8:].min() > 200  # the red edge is kept
    seen = centre_view(torch.from_numpy(stored)[None].float() / 255, torch.tensor([aspect]), 32)[0]
    original = torch.from_numpy(picture).permute(2, 0, 1)
    expected = v2.functional.center_crop(v2.functional.resize(original, [32], antialias=True), [32, 32]).float() / 255
    assert seen.shape == (3, 32, 32) and (seen - expected).abs().mean() < 0.02
    assert seen[0].max() < 0.05  # the centre square holds no red, as Resize + CenterCrop's does not


@pytest.mark.slow
def test_train_completes_on_a_cache_larger_than_its_memory_limit(tmp_path):
    """`ssl-tune train` in a memory cgroup of 1 GiB, on a 1.1 GiB cache: the images stay in the mapped
    cache (page cache, which the kernel reclaims under the limit) and only batches are read from it."""
    from PIL import Image

    from tests.conftest import SSL_TUNE, cli_env, memory_cgroup

    limit = 2**30
    root = tmp_path / "images"
    for label in range(10):  # 10 classes x 600 pictures of 256 px, 20 distinct ones hard-linked (fast to make)
        for split, count in (("train", 540), ("test", 60)):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True)
            sources = []
            for k in range(2):
                sources.append(folder / f"source{k}.jpg")
                pixels = image_folder_generator().draw(label, 256, np.random.default_rng(label * 2 + k))
                Image.fromarray(pixels).save(sources[-1], quality=90)
            for i in range(count - 2):
                os.link(sources[i % 2], folder / f"{i}.jpg")
    raw = tiny_spec_dict(training={"epochs": 1, "batch_size": 64, "seed": 0},
                         evaluation={"linear_probe": False, "batch_size": 64},
                         data={"name": "imagefolder", "root": str(root), "image_size": 32, "cache_size": 256,
                               "cache_dir": str(tmp_path / "cache")})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    env = cli_env()
    subprocess.run([SSL_TUNE, "prepare", "spec.yaml"], cwd=tmp_path, env=env, check=True, capture_output=True)
    (images,) = (tmp_path / "cache").glob("*/train_images.u8")
    cached = sum(p.stat().st_size for p in images.parent.glob("*_images.u8"))
    assert cached > limit
    with memory_cgroup(limit) as inside:
        proc = subprocess.run([*inside, SSL_TUNE, "train", "spec.yaml", "--out", "out"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # -9: killed by the OOM killer
    assert "kNN top-1, trained" in proc.stdout and (tmp_path / "out" / "checkpoint.pt").exists()
