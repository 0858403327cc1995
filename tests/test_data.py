"""Data sets, batch augmentations and the sharded loader."""

import gzip
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_tune.cli import main
from ssl_tune.data.augment import ViewAugmentation, augment_batch, preset_views
from ssl_tune.data.cache import open_dataset
from ssl_tune.data.datasets import DataError, load_dataset
from ssl_tune.spec.files import spec_from_dict
from ssl_tune.data.loader import Normalizer, ViewLoader
from tests.conftest import publish_release, tiny_spec_dict, write_spec


def test_bundled_subset_is_stratified_uint8():
    d = load_dataset("fashion_mnist_subset")
    assert d.train_images.shape == (10000, 1, 28, 28) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (2000, 1, 28, 28) and d.test_labels.dtype == torch.int64
    assert torch.bincount(d.train_labels).tolist() == [1000] * 10
    assert torch.bincount(d.test_labels).tolist() == [200] * 10
    assert d.num_classes == 10 and d.channels == 1


def _idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    d = load_dataset("fashion_mnist", tmp_path)
    assert d.train_images.shape == (6, 1, 28, 28) and d.test_labels.shape == (4,)


def write_cifar(folder: Path, batches: dict, meta_name: str, meta_key: str, protocol: int = 4) -> None:
    """Batches in the python version's layout (str keys, as Python 2 pickles read with latin1)."""
    folder.mkdir(parents=True)
    for name, batch in {**batches, meta_name: {meta_key: ["a", "b"]}}.items():
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)


def test_cifar10_and_cifar100_are_read_by_torchvision_after_their_checksums(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10, CIFAR100

    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-10-batches-py"
    batches = {name: {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [0, 1, 2]}
               for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    write_cifar(base, batches, "batches.meta", "label_names")
    with pytest.raises(DataError, match=r"data_batch_1: not the file of the official CIFAR-10 release"):
        load_dataset("cifar10", tmp_path)  # the real release's checksums
    publish_release(monkeypatch, CIFAR10, base)
    for root in (tmp_path, base):  # the folder holding the release's folder, or that folder
        d = load_dataset("cifar10", root)
        assert d.train_images.shape == (15, 3, 32, 32) and d.test_images.shape == (3, 3, 32, 32)
        assert torch.equal(d.train_images[0].flatten(), torch.from_numpy(batches["data_batch_1"]["data"][0]))
    c100 = tmp_path / "c100" / "cifar-100-python"
    write_cifar(c100, {name: {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "fine_labels": [5, 99]}
                       for name in ("train", "test")}, "meta", "fine_label_names")
    publish_release(monkeypatch, CIFAR100, c100)
    d = load_dataset("cifar100", c100.parent)
    assert d.num_classes == 100 and d.train_labels.tolist() == [5, 99]
    (c100 / "test").unlink()
    with pytest.raises(DataError, match=r"cifar-100-python/test: missing; CIFAR-100 is read from its official release"):
        load_dataset("cifar100", c100.parent)


def test_stl10_binary_format_is_column_major(tmp_path, monkeypatch):
    from torchvision.datasets import STL10

    base = tmp_path / "stl10_binary"
    base.mkdir()
    image = np.arange(3 * 96 * 96, dtype=np.uint32).astype(np.uint8).reshape(3, 96, 96)
    for split in ("train", "test", "unlabeled"):
        # the official files store each channel column by column
        np.stack([image, image]).transpose(0, 1, 3, 2).tofile(base / f"{split}_X.bin")
    for split in ("train", "test"):
        np.array([1, 10], dtype=np.uint8).tofile(base / f"{split}_y.bin")
    publish_release(monkeypatch, STL10, base)
    d = load_dataset("stl10", tmp_path)
    assert torch.equal(d.train_images[0], torch.from_numpy(image))
    assert d.train_labels.tolist() == [0, 9]
    assert len(d.ssl_images) == 4  # train + unlabeled


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / split / cls / "a.png")
    data = spec_from_dict(tiny_spec_dict(data={"name": "imagefolder", "root": str(tmp_path), "image_size": 16})).data
    d, _ = open_dataset(data)
    assert d.train_images.shape == (2, 3, 19, 19) and d.train_labels.tolist() == [0, 1]  # stored at 1.15 x 16
    assert d.image_size == 16 and d.train_aspects.tolist() == pytest.approx([40 / 30] * 2)
    assert d.train_images[0, :, 0, 0].tolist() == [10, 200, 30]


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10", "imagefolder"])
def test_malformed_root_is_a_clear_error(tmp_path, name):
    (tmp_path / "junk.txt").write_text("not a data set")
    with pytest.raises(DataError, match=str(tmp_path)):
        open_dataset(spec_from_dict(tiny_spec_dict(data={"name": name, "root": str(tmp_path)})).data)


def test_malformed_root_from_cli_exits_2(tmp_path, capsys):
    spec_file = write_spec(tmp_path, tiny_spec_dict(data={"name": "cifar10", "root": str(tmp_path)}))
    assert main(["train", str(spec_file)]) == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "data_batch_1" in err and "Traceback" not in err


def test_augment_batch_shapes_dtypes_and_determinism():
    images = torch.randint(0, 256, (16, 3, 20, 20), dtype=torch.uint8)
    for view in preset_views("byol", (0.2, 1.0)) + preset_views("weak", (0.5, 1.0)):
        a = augment_batch(images, view, torch.Generator().manual_seed(3))
        b = augment_batch(images, view, torch.Generator().manual_seed(3))
        c = augment_batch(images, view, torch.Generator().manual_seed(4))
        assert a.shape == (16, 3, 20, 20) and a.dtype == torch.float32
        assert 0 <= a.min() and a.max() <= 1
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_identity_augmentation_returns_the_images():
    images = torch.randint(0, 256, (4, 1, 12, 12), dtype=torch.uint8)
    identity = ViewAugmentation(crop_scale=(1, 1), crop_ratio=(1, 1), flip_p=0, jitter_p=0, grayscale_p=0)
    out = augment_batch(images, identity, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images.float() / 255, atol=1e-5, rtol=0)


def test_loader_shards_the_same_global_batches_over_ranks():
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    identity = ViewAugmentation(crop_scale=(1, 1), crop_ratio=(1, 1), flip_p=0, jitter_p=0, grayscale_p=0)
    norm = Normalizer(images)

    def batches(rank, world):
        loader = ViewLoader(images, [identity], norm, global_batch_size=8, seed=5, rank=rank, world_size=world)
        return [views[0] for views in loader.epoch(2)]

    whole = batches(0, 1)
    halves = zip(batches(0, 2), batches(1, 2))
    assert len(whole) == 5
    for full, (a, b) in zip(whole, halves):
        torch.testing.assert_close(torch.cat([a, b]), full)


def test_loader_order_depends_on_seed_and_epoch_only():
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    views = preset_views("byol", (0.3, 1.0))
    loader = ViewLoader(images, views, Normalizer(images), global_batch_size=8, seed=1)
    first = [v for step in loader.epoch(0) for v in step]
    again = [v for step in loader.epoch(0) for v in step]
    other = [v for step in loader.epoch(1) for v in step]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def _memmap_images(tmp_path, n=70, shape=(3, 10, 10)):
    data = np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)
    path = tmp_path / "images.u8"
    data.tofile(path)
    return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=data.shape))


@pytest.mark.parametrize("prefetch", [1, 3])
def test_streamed_batches_equal_resident_batches_bit_for_bit(tmp_path, prefetch):
    images = _memmap_images(tmp_path)
    views = preset_views("byol", (0.2, 1.0))
    norm = Normalizer(images)
    for rank in (0, 1):
        def epoch(stream, slow=False):
            loader = ViewLoader(images if stream else images.clone(), views, norm, global_batch_size=8, seed=3, rank=rank,
                                world_size=2, stream=stream, prefetch=prefetch)
            out = []
            for views_ in loader.epoch(4):
                if slow:  # the background thread fills every buffer of its ring meanwhile
                    time.sleep(0.02)
                out.append([v.clone() for v in views_])
            return out

        resident = epoch(False)
        assert len(resident) == 70 // 8
        for streamed in (epoch(True), epoch(True, slow=True)):
            assert all(torch.equal(a, b) for step_a, step_b in zip(resident, streamed) for a, b in zip(step_a, step_b))
            assert len(streamed) == len(resident)


def test_streaming_stops_its_thread_when_the_consumer_stops_early(tmp_path):
    images = _memmap_images(tmp_path)
    loader = ViewLoader(images, preset_views("weak", (0.5, 1.0)), Normalizer(images), global_batch_size=4, seed=0,
                        stream=True)
    before = threading.active_count()
    epoch = loader.epoch(0)
    next(epoch)
    assert threading.active_count() == before + 1
    epoch.close()  # what a `for` loop left by an exception does
    assert threading.active_count() == before


def test_resident_images_must_be_on_the_device():
    images = torch.zeros(8, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="resident images must be on meta"):
        ViewLoader(images, preset_views("weak", (0.5, 1.0)), Normalizer(images), global_batch_size=4, seed=0,
                   device=torch.device("meta"))
