"""A fifth method is one file plus one YAML: a toy method from a temporary directory
($SSL_TUNE_METHOD_PATH) is found by the registry and runs through every shared suite with no
other edit."""

import os
import re
import subprocess
import sys

import pytest

from ssl_tune.spec import SpecError
from tests.conftest import ROOT

TOY_METHOD = '''"""Toy: cosine agreement of two views, plus a hinge on each embedding dimension's spread over the
global batch (a method for the tests, in the shape of a real one)."""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ssl_tune.distributed import gather_with_grad
from ssl_tune.models import mlp
from ssl_tune.spec import MethodConfig, ProjectorSpec, Searchable
from trainers.base import Method, StepOutput


class ToyConfig(MethodConfig):
    name: Literal["toy"] = "toy"
    weight: Searchable[float] = Field(1.0, description="weight of the spread term")


class Toy(Method):
    name = "toy"
    Config = ToyConfig

    def __init__(self, config: ToyConfig, backbone: torch.nn.Module, projector: ProjectorSpec, seed: int = 0) -> None:
        super().__init__(config, backbone, projector, seed)
        self.projector = mlp(backbone.output_dim, projector.hidden_dim, projector.output_dim, projector.num_layers)

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        z1, z2 = (gather_with_grad(self.projector(self.backbone(v))) for v in views)
        agreement = -F.cosine_similarity(z1, z2).mean()
        spread = F.relu(1 - z1.std(0)).mean()
        return StepOutput(agreement + self.config.weight * spread, {"agreement": agreement.detach(), "spread": spread.detach()})


METHOD = Toy
'''

TOY_SPEC = """name: toy
method:
  name: toy
  weight: {type: uniform, low: 0.5, high: 2.0, default: 1.0}
data: {name: fashion_mnist_subset}
backbone: {name: small_cnn, width: 8}
projector: {hidden_dim: 64, output_dim: 32, num_layers: 2}
optimizer: {name: lars, lr: 1.0, warmup_epochs: 1}
training: {epochs: 2, batch_size: 256, seed: 0}
evaluation: {linear_probe_epochs: 10}
"""


@pytest.fixture
def toy_dir(tmp_path, monkeypatch):
    (tmp_path / "toy.py").write_text(TOY_METHOD)
    (tmp_path / "toy.yaml").write_text(TOY_SPEC)
    monkeypatch.setenv("SSL_TUNE_METHOD_PATH", str(tmp_path))
    yield tmp_path
    sys.modules.pop("toy", None)


def test_a_method_directory_adds_its_methods_to_the_registry_and_the_spec(toy_dir):
    from ssl_tune.spec.files import load_spec
    from trainers import builtin_methods, methods

    assert "toy" in methods() and "toy" not in builtin_methods()
    assert set(builtin_methods()) < set(methods())
    spec = load_spec(toy_dir / "toy.yaml")
    assert spec.method.name == "toy" and list(spec.search_ranges()) == ["method.weight"]
    with pytest.raises(SpecError, match=r"method.weigth: unknown field; allowed here: name, weight"):
        load_spec(toy_dir / "toy.yaml", ["method.weigth=1"])


def test_two_methods_of_one_name_and_a_missing_directory_are_named(tmp_path, monkeypatch):
    from trainers import methods

    (tmp_path / "twist_again.py").write_text("from trainers.twist import Twist\n\n\nclass Again(Twist):\n    pass\n\n\nMETHOD = Again\n")
    monkeypatch.setenv("SSL_TUNE_METHOD_PATH", str(tmp_path))
    with pytest.raises(SpecError, match=r"twist_again.py: method name 'twist' is already defined by trainers.twist"):
        methods()
    monkeypatch.setenv("SSL_TUNE_METHOD_PATH", str(tmp_path / "missing"))
    with pytest.raises(SpecError, match=r"SSL_TUNE_METHOD_PATH: .*missing is not a directory"):
        methods()


# The shared suites' tests of one method, with how many there are per method.
SHARED_SUITES = {
    # exact resume, divergence, 2-rank DDP equality, a ViT-tiny trained and loaded, SyncBatchNorm's conversion
    "tests/test_trainer.py": 5,
    "tests/test_cli_train.py": 1,  # `ssl-tune train` from the method's YAML
    "tests/test_spec.py": 2,  # the spec reference documents it; its YAML loads and resolves
}


@pytest.mark.slow
def test_the_toy_method_passes_every_shared_suite_with_no_other_edit(toy_dir):
    # In one process (-n 0): 8 short tests, where two pytest-xdist workers would each import and collect them again.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-k", "toy",
                           *SHARED_SUITES], cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) == sum(SHARED_SUITES.values()), summary
