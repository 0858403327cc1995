import os
import tempfile

import pytest
import torch

# Data caches the tests build go to a fresh directory, never to the user's ~/.cache/ssl-tune (inherited
# by every process the tests start).
os.environ["SSL_TUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="ssl-tune-test-cache-")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def twist_spec_path():
    return os.path.join(ROOT, "search_spaces", "twist.yaml")


def tiny_spec_dict(**sections):
    """A small resolved TWIST spec for fast tests; sections override whole sections."""
    raw = {
        "name": "tiny",
        "method": {"name": "twist", "lam1": 0.0, "lam2": 1.0, "tau": 1.0},
        "backbone": {"name": "small_cnn", "width": 4},
        "projector": {"hidden_dim": 16, "output_dim": 8, "num_layers": 2},
        "optimizer": {"name": "lars", "lr": 0.3, "warmup_epochs": 0},
        "training": {"epochs": 2, "batch_size": 32, "seed": 0},
        "evaluation": {"linear_probe_epochs": 2},
    }
    raw.update(sections)
    return raw
