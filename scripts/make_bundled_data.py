"""Build ssl_tune/data/fashion_mnist_subset.npz from Debian's dataset-fashion-mnist.

    apt-get install dataset-fashion-mnist
    python scripts/make_bundled_data.py

A class-stratified subset (1000 train / 200 test images per class), fixed seed, so the file
is reproducible.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ssl_tune.data.datasets import BUNDLED_FILE, DEBIAN_FASHION_MNIST, read_idx


def stratified(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEBIAN_FASHION_MNIST)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "ssl_tune" / "data" / BUNDLED_FILE)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    xtr = read_idx(args.source / "train-images-idx3-ubyte.gz")
    ytr = read_idx(args.source / "train-labels-idx1-ubyte.gz")
    xte = read_idx(args.source / "t10k-images-idx3-ubyte.gz")
    yte = read_idx(args.source / "t10k-labels-idx1-ubyte.gz")
    tr = stratified(ytr, args.train_per_class, rng)
    te = stratified(yte, args.test_per_class, rng)
    np.savez_compressed(args.out, train_images=xtr[tr], train_labels=ytr[tr], test_images=xte[te], test_labels=yte[te])
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB): {len(tr)} train, {len(te)} test")


if __name__ == "__main__":
    main()
