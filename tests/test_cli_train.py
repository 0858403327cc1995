"""`ssl-tune train` end to end on the bundled data, through the installed console script."""

import json
import subprocess

import pytest
import torch

import ssl_tune
from ssl_tune.report.figures import TRAINING_METRICS
from tests.conftest import SMALL_SUBSET, SSL_TUNE, method_names, method_spec_file

FAST = ["--set", "backbone.width=4", "--set", "projector={hidden_dim: 32, output_dim: 16, num_layers: 2}",
        "--set", "training.batch_size=500", "--set", "evaluation.linear_probe_epochs=3",
        "--set", "evaluation.label_fractions=[0.01, 0.1]", "--set", f"data.subset={SMALL_SUBSET}"]


def run(*args):
    return subprocess.run([SSL_TUNE, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_then_resume(tmp_path, twist_spec_path):
    out = tmp_path / "run"
    proc = run("train", twist_spec_path, "--set", "training.epochs=1", *FAST, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "random-init kNN top-1" in proc.stdout and "epoch 1/1" in proc.stdout
    assert "linear top1 labels 1pct" in proc.stdout
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history) == 1
    last = history[-1]
    for key in ("loss", "kl", "eh", "he", "lr", "images_per_s", "knn_top1", "knn_top5", "knn_top1_random_init",
                "linear_top1", "linear_top1_labels_1pct", "linear_top1_labels_10pct"):
        assert key in last, key
    assert 10 <= last["knn_top1"] <= 100
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    # the checkpoint carries its input contract: the bundled data's grey 28 x 28 images and their statistics
    backbone, preprocess = ssl_tune.load_backbone(out / "checkpoint.pt")
    contract = preprocess.contract
    assert (contract.channels, contract.image_size, contract.dataset) == (1, 28, "fashion_mnist_subset")
    assert backbone(preprocess(torch.zeros(3, 1, 28, 28, dtype=torch.uint8))).shape == (3, backbone.output_dim)

    proc = run("train", twist_spec_path, "--set", "training.epochs=2", *FAST, "--out", str(out),
               "--resume", str(out / "checkpoint.pt"))
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "epoch 2/2" in proc.stdout and "epoch 1/2" not in proc.stdout
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", method_names())
def test_method_trains_from_its_search_space(tmp_path, method):
    """Every registered method trains from its own YAML through the CLI, prints its loss terms and
    writes its checkpoint and figures (exact resume of its state: tests/test_trainer.py)."""
    spec_path = str(method_spec_file(method))
    small = ["--set", "training.epochs=1", "--set", "backbone.width=4", "--set", "training.batch_size=512",
             "--set", "projector={hidden_dim: 32, output_dim: 16, num_layers: 2}", "--set", "evaluation.linear_probe_epochs=3"]
    proc = run("train", spec_path, *small, "--out", str(tmp_path / method))
    assert proc.returncode == 0, proc.stderr
    assert "kNN top-1, trained" in proc.stdout
    (epoch,) = json.loads((tmp_path / method / "metrics.json").read_text())["history"]
    terms = [k for k in epoch if k not in ("loss", *TRAINING_METRICS) and not k.startswith(("knn", "linear"))]
    assert terms and all(f"{term} " in proc.stdout for term in terms)
    assert torch.load(tmp_path / method / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert {"embedding.png", "knn_confusion.png"} <= {p.name for p in (tmp_path / method / "figures").iterdir()}


@pytest.mark.slow
def test_the_docs_train_example_runs_as_written(tmp_path):
    import re
    import shutil
    import sys
    from pathlib import Path

    from tests.conftest import ROOT

    text = (Path(ROOT) / "docs" / "first-search.md").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "ssl_tune.train(" in b]
    shutil.copytree(Path(ROOT) / "search_spaces", tmp_path / "search_spaces")
    ran = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    status, knn = ran.stdout.split()[-2:]
    assert status == "finished" and 0 < float(knn) <= 100
    assert (tmp_path / "runs" / "twist" / "checkpoint.pt").is_file()
