"""One search, one folder: searches that share a name never share Ray Tune's state, `resume` and its
replay into MLflow take only the resumed search's own trials, and the commands printed for a search stay
unambiguous. The first test runs real searches (real Ray, sqlite MLflow); the rest check in-process."""

import os
import signal
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import yaml

from ssl_tune import tracking
from ssl_tune.searching import replay
from ssl_tune.searching.space import SEARCH_RUN_KEY, field_values
from ssl_tune.spec.files import spec_from_dict
from tests.conftest import (epoch_steps, output, printed_command, run_cli, search_spec, start_cli, tiny_spec_dict,
                            wait_for)

EPOCHS = 4


def two_trial_spec() -> dict:
    """2 trials of 4 epochs, one at a time, on all the bundled images (batch 250): long enough (about 30 s a
    search) that the second search starts training while the first one does."""
    raw = search_spec(num_samples=2, scheduler="none", points_to_evaluate=[], max_concurrent=1)
    raw["training"], raw["data"] = {"epochs": EPOCHS, "batch_size": 250, "seed": 0}, {}
    return raw


def searches(work):
    """name-independent view of WORK's store: parent run id -> (parent run, its trial runs)."""
    client = tracking.client_for(f"sqlite:///{work}/mlflow.db")
    experiment = client.get_experiment_by_name("search-test")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    parents = {r.info.run_id: r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "search"}
    return client, {pid: (parent, [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "trial"
                                    and r.data.tags.get("mlflow.parentRunId") == pid]) for pid, parent in parents.items()}


def tune_trial_ids(folder) -> set[str]:
    """The trial ids of a search's Tune folder (each trial directory's result.json)."""
    import json

    ids = set()
    for path in folder.glob("run_trial_*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            ids.add(lines[-1]["trial_id"])
    return ids


@pytest.mark.ray
@pytest.mark.slow
def test_two_searches_of_one_name_at_once_each_keeps_its_own_folder_trials_and_commands(tmp_path, cli_here):
    """Real searches where the process boundary matters (a signal, exit statuses, Ray); the commands that start
    no Ray (a refused resume, export, results) run in-process, in the searches' directory."""
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(two_trial_spec()))

    def training(pid=None) -> bool:
        """Whether the search `pid` (None: any other than the first) has a trial past its first epoch."""
        _, found = searches(tmp_path)
        return any(t.info.status == "RUNNING" and t.data.metrics.get("epoch", 0) >= 1
                   for p, (_, trials) in found.items() if (p == pid if pid else p != first_id) for t in trials)

    # Two searches named "same" at once; the first is stopped by SIGTERM in the middle of a trial.
    first = start_cli(["run", "spec.yaml", "--name", "same"], cwd=tmp_path)
    (first_id,) = wait_for(lambda: list(searches(tmp_path)[1]), 300, "the first search's parent run", first)
    second = start_cli(["run", "spec.yaml", "--name", "same", "--set", "search.seed=7"], cwd=tmp_path)
    try:
        wait_for(lambda: training(first_id) and training(), 300, "both searches training", first)
        os.kill(first.pid, signal.SIGTERM)
        first.wait(timeout=120)
        assert first.returncode == 130, output(first)[-4000:]
        second.wait(timeout=600)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    out_first, out_second = output(first), output(second)
    assert second.returncode == 0, out_second[-4000:]
    assert printed_command(out_first, "resume with:") == ["resume", first_id]
    client, found = searches(tmp_path)
    (second_id,) = set(found) - {first_id}
    # The second run said it starts beside an unfinished search of its name, and how that one goes on.
    assert f"note: 2 searches are now named 'same'; this one (run id {second_id}) has its own" in out_second
    assert printed_command(out_second, f"  the unfinished search {first_id} (RUNNING) goes on (if its driver is gone) "
                                       "with:  ") == ["resume", first_id]
    # Its printed next steps name it by run id: the name fits two searches.
    assert printed_command(out_second, "export the best backbone:") == ["export", second_id]
    assert f"load_backbone('exports/{second_id}')" in out_second

    # One folder each, recorded on each parent run.
    folders = {pid: parent.data.tags[tracking.TAG_STORAGE] for pid, (parent, _) in found.items()}
    assert len(set(folders.values())) == 2
    for folder in folders.values():
        assert os.path.basename(folder).startswith("same-") and os.path.isfile(os.path.join(folder, "tuner.pkl"))
        assert (tmp_path / "ssl_tune_runs" / f"{os.path.basename(folder)}.log").is_file()  # its own driver log

    # The name alone is refused where it fits both; the tie is listed.
    status, _, err = cli_here("export", "same")
    assert status == 2 and "2 searches are named 'same'" in err and first_id in err and second_id in err

    # The first search's state, restored into the second's record (as a shared folder did): refused, one line.
    client.set_tag(first_id, tracking.TAG_STORAGE, folders[second_id])
    status, _, err = cli_here("resume", first_id)  # refused before Ray starts
    (line,) = err.strip().splitlines()
    assert status == 2 and f"search 'same' ({second_id})" in line and f"search 'same' ({first_id})" in line, err
    client.set_tag(first_id, tracking.TAG_STORAGE, folders[first_id])
    _, unchanged = searches(tmp_path)
    assert unchanged[first_id][0].info.status == "KILLED" and len(unchanged[first_id][1]) == len(found[first_id][1])

    # `resume same`: of the two named so, the one unfinished search.
    resumed = run_cli(["resume", "same"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "search finished: 2 trials" in resumed.stdout
    assert printed_command(resumed.stdout, "export the best backbone:") == ["export", first_id]

    # Each parent holds exactly the trials of its own folder, every epoch once.
    client, found = searches(tmp_path)
    for pid, (parent, trials) in found.items():
        assert parent.info.status == "FINISHED"
        assert {t.data.tags[tracking.TAG_TRIAL_ID] for t in trials} == tune_trial_ids(
            tmp_path / "ssl_tune_runs" / os.path.basename(folders[pid])), pid
        assert len(trials) == 2
        for trial in trials:
            assert trial.info.status == "FINISHED" and epoch_steps(client, trial) == list(range(1, EPOCHS + 1))
    status, _, err = cli_here("export", first_id, "--out", "first")
    assert status == 0 and (tmp_path / "first" / "backbone.pt").is_file(), err
    status, _, err = cli_here("results", second_id, "--out", "second.parquet")
    assert status == 0, err
    listed = {row["trial_id"] for row in pq.read_table(tmp_path / "second.parquet").to_pylist()}
    assert listed == {t.data.tags[tracking.TAG_TRIAL_ID] for t in found[second_id][1]}


# --- in-process ---------------------------------------------------------------------------------


def store(tmp_path):
    return tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")


def search_run(client, experiment: str, name: str, status: str = "RUNNING"):
    run = client.create_run(experiment, run_name=name, tags={tracking.TAG_KIND: "search"})
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return client.get_run(run.info.run_id)


def trial_run(client, parent, trial_id: str) -> None:
    client.create_run(parent.info.experiment_id, tags={tracking.TAG_KIND: "trial", tracking.TAG_TRIAL_ID: trial_id,
                                                       "mlflow.parentRunId": parent.info.run_id})


def test_a_name_run_again_after_a_stop_resumes_the_stopped_search_and_prints_its_run_id(tmp_path):
    client = store(tmp_path)
    experiment = client.create_experiment("twist")
    stopped = search_run(client, experiment, "first", "KILLED")
    assert tracking.search_reference(client, stopped.info.run_id) == "first"  # the only search of that name
    again = search_run(client, experiment, "first", "FINISHED")
    assert tracking.find_parent_run(client, "first", unfinished=True).info.run_id == stopped.info.run_id
    with pytest.raises(LookupError, match="2 searches are named 'first'"):
        tracking.find_parent_run(client, "first")  # results and export: which one is not theirs to guess
    assert tracking.search_reference(client, again.info.run_id) == again.info.run_id
    search_run(client, experiment, "first")  # a third, still running: two unfinished, so resume asks too
    with pytest.raises(LookupError, match="2 unfinished searches are named 'first'"):
        tracking.find_parent_run(client, "first", unfinished=True)


def results_of(*trials: tuple[str, str | None]):
    """A stand-in for Tune's ResultGrid: one result per (trial id, the search its config names, if any)."""
    return [SimpleNamespace(config={"method.tau": 1.0, **({SEARCH_RUN_KEY: owner} if owner else {})},
                            metrics={"trial_id": trial_id, "epoch": 1.0}, path="", error=None) for trial_id, owner in trials]


def test_trials_of_another_search_are_refused_by_their_config_or_for_older_ones_by_mlflow(tmp_path):
    client = store(tmp_path)
    experiment = client.create_experiment("twist")
    mine, other = search_run(client, experiment, "same"), search_run(client, experiment, "same")
    mine_id, other_id = mine.info.run_id, other.info.run_id
    replay.check_owned(client, mine, results_of(("a", mine_id), ("b", mine_id)), "resume")  # its own: accepted
    with pytest.raises(replay.SearchMismatch) as refused:
        replay.check_owned(client, mine, results_of(("a", mine_id), ("c", other_id)), "resume")
    message = str(refused.value)
    assert message.startswith("resume: ") and "\n" not in message
    assert f"search 'same' ({other_id})" in message and f"search 'same' ({mine_id})" in message
    # Trials from before each search had its own folder name no search: their MLflow runs tell.
    trial_run(client, mine, "old1")
    trial_run(client, other, "old2")
    replay.check_owned(client, mine, results_of(("old1", None), ("never-logged", None)), "resume")
    with pytest.raises(replay.SearchMismatch, match=f"holds trials of search 'same' \\({other_id}\\)"):
        replay.check_owned(client, mine, results_of(("old1", None), ("old2", None)), "resume")


def test_replay_refuses_another_searchs_results_before_writing_anything(tmp_path):
    spec = spec_from_dict({**tiny_spec_dict(), "search": {"metric": "loss", "mode": "min"}})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = store(tmp_path)
    experiment = client.create_experiment("twist")
    mine, other = search_run(client, experiment, "same"), search_run(client, experiment, "same")
    logger = tracking.MlflowTrialLogger(uri, experiment, mine.info.run_id, spec)
    with pytest.raises(replay.SearchMismatch, match="^replay: "):
        replay.replay(results_of(("a", mine.info.run_id), ("b", other.info.run_id)), logger)
    assert tracking.child_runs(client, mine, kind=None) == []


def test_the_search_key_in_a_trials_config_is_no_spec_field():
    assert field_values({"method.tau": 0.5, SEARCH_RUN_KEY: "abc"}) == {"method.tau": 0.5}
