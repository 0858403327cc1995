"""The tags ssl-tune writes on its MLflow runs (namespaced so they never clash with MLflow's own);
`ssl-tune resume`, `results` and `export` read them back."""

from ssl_tune.trials.uploads import TAG_CHECKPOINT_ARTIFACT, TAG_TRIAL_ID  # noqa: F401  (written by the trial itself)

TAG_KIND = "ssl_tune.kind"  # "search" on parents; on children "trial", or "confirmation" (`ssl_tune.searching.confirmation`)
KIND_TRIAL, KIND_CONFIRMATION = "trial", "confirmation"
TAG_CONFIRMS = "ssl_tune.confirms"  # on confirmations: the search trial's run id, or "default"
TAG_SEED = "ssl_tune.seed"  # on confirmations: the training seed
TAG_ROUND = "ssl_tune.confirm_round"  # on confirmations: the race's round that trained (or reused) it
TAG_IDENTITY = "ssl_tune.confirm_identity"  # on confirmations: what reuse matches (`race_record.run_identity`)
TAG_REUSED_FROM = "ssl_tune.reused_from"  # on a reused confirmation: the run that trained it
TAG_STAGE = "ssl_tune.searching.stage"  # on parents: "confirmation" while its trials run, then "done"
TAG_CONFIRMATION_TRIALS = "ssl_tune.confirmation_trials"  # on parents: how many the stage runs
TAG_VERDICT = "ssl_tune.confirmation_verdict"  # on parents: whether the winner beats the default
TAG_BEATS_DEFAULT = "ssl_tune.beats_default"  # on parents: "true" / "false"
# On parents: whether the confirmation kept the search's order of its configurations (`confirmation.rank_transfer`).
TAG_RANK_TRANSFER = "ssl_tune.rank_transfer"
# On trials: the checkpoint the objective was measured on (its last evaluated epoch; `ssl_tune.searching.space`).
TAG_CHECKPOINT = "ssl_tune.checkpoint"
TAG_CHECKPOINT_EPOCH = "ssl_tune.checkpoint_epoch"
TAG_STOPPED_AT = "ssl_tune.stopped_at_epoch"
TAG_BEST_TRIAL_RUN = "ssl_tune.best_trial_run_id"
TAG_METRIC = "ssl_tune.metric"
TAG_MODE = "ssl_tune.mode"
TAG_SEARCHED = "ssl_tune.searched_params"
TAG_ERROR = "ssl_tune.error"
TAG_DAMAGED_CHECKPOINT = "ssl_tune.damaged_checkpoint"  # on trials: a checkpoint skipped at a restore, and why
TAG_RESTARTS = "ssl_tune.restarts"
TAG_LAST_RESTART = "ssl_tune.last_restart_reason"
# Statuses of a search's parent run that `ssl-tune resume` cannot continue (KILLED means interrupted).
ENDED = ("FINISHED", "FAILED")
TAG_STORAGE = "ssl_tune.storage"  # on parents: the Tune experiment directory (what `ssl-tune resume` restores)
TAG_INTERRUPTED_AT = "ssl_tune.interrupted_at_epoch"
TAG_EPOCHS_LOST = "ssl_tune.epochs_lost"  # completed epochs trained again after restarts
# On trials: where its configuration came from: "sampler", "points_to_evaluate" or "warm_start:SEARCH"
# (`ssl_tune.searching.warm_start`); on parents, what each earlier search of `search.warm_start` gave, a line each.
TAG_ORIGIN = "ssl_tune.origin"
TAG_WARM_START = "ssl_tune.searching.warm_start"
TAG_METHOD = "ssl_tune.method"  # on parents: the method(s) searched, comma-separated; on children: the trial's

# A trial's status as people read it (leaderboards, Parquet, `Search.leaderboard()`, the console table).
# MLflow's own has KILLED both for a trial ASHA stopped early and for one a Ctrl-C interrupted.
FINISHED, STOPPED, INTERRUPTED, FAILED, RUNNING = "finished", "stopped", "interrupted", "failed", "running"


def trial_status(run) -> str:
    """`FINISHED`, `STOPPED` (early, by ASHA), `INTERRUPTED` (resume continues it), `FAILED` or `RUNNING`."""
    status = run.info.status
    if status == "KILLED":
        return STOPPED if TAG_STOPPED_AT in run.data.tags else INTERRUPTED
    return {"FINISHED": FINISHED, "FAILED": FAILED}.get(status, RUNNING)
