"""A search across methods: `method.name` as a choice whose branches hold each method's own ranges."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from ssl_tune import load_backbone, tracking
from ssl_tune.spec import SpecError
from ssl_tune.spec.files import load_spec, spec_from_dict
from tests.conftest import ROOT, SMALL_SUBSET, run_cli, runs_of, search_spec

ANY_METHOD = Path(ROOT) / "search_spaces" / "any_method.yaml"


def test_the_shipped_cross_method_spec_loads_and_trains_the_first_methods_default():
    spec = load_spec(ANY_METHOD)
    assert spec.method_names() == ["twist", "isd", "corinfomax", "ssl_hsic"]
    resolved = spec.resolve()
    assert resolved.method.name == "twist" and resolved.method.tau == 1.0
    assert spec.resolve({"method.name": "isd", "method.t_teacher": 0.05}).method.t_teacher == 0.05


@pytest.mark.parametrize("method, message", [
    ({"name": {"type": "choice", "values": ["twist", "simclr"]}}, "method.name: 'simclr' is not a method; allowed: "),
    ({"name": {"type": "choice", "values": ["twist", "isd"],
               "branches": {"isd": {"method.tau": {"type": "uniform", "low": 0.1, "high": 1.0}}}}},
     "method.name.branches.isd.method.tau: not a field of isd; allowed: method.variant, method.t_teacher"),
    ({"name": {"type": "choice", "values": ["twist", "isd"],
               "branches": {"isd": {"method.t_teacher": {"type": "uniform", "low": -1.0, "high": 1.0}}}}},
     "method.name.branches.isd.method.t_teacher: the range allows -1.0"),
])
def test_bad_cross_method_specs_name_the_field(method, message):
    raw = search_spec()
    raw["method"] = method
    with pytest.raises(SpecError, match=message.replace(".", r"\.")):
        spec_from_dict(raw)


@pytest.mark.slow
def test_cli_train_on_the_cross_method_spec(tmp_path):
    proc = run_cli(["train", str(ANY_METHOD), "--out", "out", "--set", "training.epochs=1", "--set",
                    "evaluation.linear_probe=false", "--set", f"data.subset={SMALL_SUBSET}", "--set", "backbone.width=4"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "training twist on fashion_mnist_subset" in proc.stdout
    assert yaml.safe_load((tmp_path / "out" / "spec.json").read_text())["method"]["name"] == "twist"


@pytest.mark.ray
@pytest.mark.slow
def test_search_across_methods_end_to_end(tmp_path, cli_here):
    raw = search_spec(num_samples=4, max_concurrent=2, metric="knn_top1", mode="max", points_to_evaluate=[
        {"method.name": "isd", "method.t_teacher": 0.02}, {"method.name": "corinfomax", "method.eps": 1.0e-8}])
    raw["method"] = {"name": {"type": "choice", "values": ["isd", "corinfomax"], "branches": {
        "isd": {"method.t_teacher": {"type": "loguniform", "low": 0.005, "high": 0.1}},
        "corinfomax": {"method.eps": {"type": "loguniform", "low": 1.0e-10, "high": 1.0e-3}}}}}
    raw["training"]["batch_size"] = 256  # ISD's bank (4096) holds whole batches
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    proc = run_cli(["run", "spec.yaml", "--name", "x"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, (parent,), trials = runs_of(tmp_path)
    assert parent.data.tags[tracking.TAG_METHOD] == "isd,corinfomax"
    by_method = {t.data.tags[tracking.TAG_METHOD] for t in trials}
    assert by_method == {"isd", "corinfomax"}  # every method sampled, each trial tagged with its own
    for trial in trials:
        assert trial.data.params["method.name"] == trial.data.tags[tracking.TAG_METHOD]
        own = "method.t_teacher" if trial.data.params["method.name"] == "isd" else "method.eps"
        assert own in trial.data.params
    # the best trial of each method, on the parent and in the console's leaderboard
    rows = tracking.leaderboard(client, parent)
    per_method = tracking.best_per_method(rows, "max")
    assert [r["method.name"] for r in per_method] and {r["method.name"] for r in per_method} == by_method
    for row in per_method:
        assert parent.data.metrics[f"best_knn_top1.{row['method.name']}"] == row["objective"]
    assert "best trial per method" in proc.stdout
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "best_per_method.txt" in artifacts
    assert "figures/methods.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    # export records the winning method; load_backbone builds that method's network
    status, _, err = cli_here("export", "x", "--out", "best")
    assert status == 0, err
    winner = client.get_run(json.loads((tmp_path / "best" / "metrics.json").read_text())["run_id"])
    exported = yaml.safe_load((tmp_path / "best" / "spec.yaml").read_text())
    assert exported["method"]["name"] == winner.data.tags[tracking.TAG_METHOD] == rows[0]["method.name"]
    backbone, preprocess = load_backbone(tmp_path / "best")
    assert backbone(preprocess(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))).shape[0] == 2
