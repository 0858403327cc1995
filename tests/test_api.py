"""The Python API (`ssl_tune.api`): a notebook's search, opened again elsewhere, against what the CLI shows."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ssl_tune
from ssl_tune.searching.driver import SearchOutcome
from tests.conftest import ROOT, cli_env


def docs_python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (Path(ROOT) / "docs" / page).read_text(), flags=re.S)


@pytest.fixture(scope="module")
def notebook_search(tmp_path_factory):
    """The docs' notebook session, run as written in a fresh process (Ray starts in it)."""
    work = tmp_path_factory.mktemp("notebook")
    shutil.copytree(Path(ROOT) / "search_spaces", work / "search_spaces")
    [block] = docs_python_blocks("python-api.md")
    proc = subprocess.run([sys.executable, "-c", block], cwd=work, capture_output=True, text=True, timeout=600,
                          env=cli_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc


@pytest.mark.ray
@pytest.mark.slow
def test_a_notebook_search_opens_by_name_from_another_directory(notebook_search, tmp_path, monkeypatch):
    work, proc = notebook_search
    assert "rank" in proc.stdout and "BestTrial(" in proc.stdout
    monkeypatch.chdir(tmp_path)  # another directory: the store is named, not found next to the caller
    found = ssl_tune.open_search("notebook", tracking_uri=f"sqlite:///{work}/mlflow.db")
    assert found.name == "notebook" and found.status == "FINISHED" and (found.metric, found.mode) == ("knn_top1", "max")
    table = found.leaderboard()
    assert list(table["rank"]) == [1, 2] and table["objective"].is_monotonic_decreasing
    assert set(table["status"]) <= {"finished", "stopped"}
    assert found.best.run_id == table["run_id"][0] and not found.best.confirmed
    assert found.best.params == {p: table[p][0] for p in found.best.params}
    assert found.confirmation is None
    with pytest.raises(LookupError, match="tracking store sqlite:///"):
        ssl_tune.open_search("no-such-search", tracking_uri=f"sqlite:///{work}/mlflow.db")


@pytest.mark.ray
@pytest.mark.slow
def test_the_leaderboard_is_what_results_writes_to_parquet(notebook_search, cli_here):
    import pandas
    import pyarrow.parquet as pq

    work, _ = notebook_search
    status, _, err = cli_here("results", "notebook", "--out", "trials.parquet", cwd=work)
    assert status == 0, err
    written = pq.read_table(work / "trials.parquet").to_pandas()
    pandas.testing.assert_frame_equal(ssl_tune.open_search("notebook", f"sqlite:///{work}/mlflow.db").leaderboard(),
                                      written, check_dtype=False)


@pytest.mark.ray
@pytest.mark.slow
def test_export_and_load_from_the_search_object(notebook_search, tmp_path):
    import torch

    work, _ = notebook_search
    found = ssl_tune.open_search("notebook", f"sqlite:///{work}/mlflow.db")
    out = found.export(tmp_path / "best")
    assert {p.name for p in out.iterdir()} >= {"backbone.pt", "head.pt", "spec.yaml", "input.json", "metrics.json"}
    backbone, preprocess = found.load_backbone()
    exported, _ = ssl_tune.load_backbone(work / "exports" / "notebook")  # what the notebook exported
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(backbone(preprocess(image)[None]), exported(preprocess(image)[None]))


def test_overrides_are_dotted_field_names_and_a_bad_one_names_the_field(twist_spec_path):
    from ssl_tune.api import load
    from ssl_tune.spec import SpecError

    spec = load(twist_spec_path, {"training.epochs": 3, "search.confirm.top_k": 0})
    assert spec.training.epochs == 3 and spec.search.confirm.top_k == 0
    assert load(spec, {"training.batch_size": 64}).training.epochs == 3  # a spec object, overridden again
    with pytest.raises(SpecError, match=r"twist.yaml \(with overrides .*training.epochz"):
        load(twist_spec_path, {"training.epochz": 3})
    with pytest.raises(SpecError, match="dotted field name"):
        load(twist_spec_path, {"training.": 3})


def test_resume_ranks_each_methods_best_by_the_searchs_own_mode(monkeypatch, capsys, tmp_path):
    """`ssl-tune resume` reads the spec back from MLflow; it once ranked with mode "max" whatever the spec said."""
    from ssl_tune.searching import driver as tuning
    from ssl_tune.cli import main

    rows = [{"rank": 1, "method.name": "isd", "objective": 0.5, "status": "finished", "run_id": "a"},
            {"rank": 2, "method.name": "twist", "objective": 1.0, "status": "finished", "run_id": "b"},
            {"rank": 3, "method.name": "twist", "objective": 2.0, "status": "finished", "run_id": "c"},
            {"rank": 4, "method.name": "isd", "objective": 3.0, "status": "finished", "run_id": "d"}]
    outcome = SearchOutcome("across", "parent", f"sqlite:///{tmp_path}/mlflow.db", "loss", "min", rows, "a",
                            trials_done=4, trials_ok=4)
    monkeypatch.setattr(tuning, "resume_search", lambda *args, **kwargs: outcome)
    assert main(["resume", "across"]) == 0
    out = capsys.readouterr().out
    assert "objective loss (min)" in out
    per_method = out.split("best trial per method:\n")[1].split("\n\n")[0].splitlines()[1:]
    assert [line.split()[1:3] for line in per_method] == [["isd", "0.5"], ["twist", "1"]]


def test_a_run_that_ssl_tune_did_not_write_is_refused_by_name(tmp_path):
    from ssl_tune import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.client_for(uri)
    run = client.create_run(client.create_experiment("someone-else"))
    with pytest.raises(LookupError, match=f"run {run.info.run_id} is not an ssl-tune search.*tracking store {uri}"):
        ssl_tune.open_search(run.info.run_id, tracking_uri=uri)
