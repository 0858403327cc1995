"""MLflow tracking of a search: one parent run, one nested child run per trial.

The Tune driver writes the runs, their parameters, metrics and tags (`trial_logger`, a Tune callback,
through `writer`'s background thread); metrics go in one `log_batch` call per epoch, and Tune's
bookkeeping keys are never logged. Each trial adds its own system metrics and exports to its run from
its own process (`ssl_tune.trials.uploads`). One module per concern:

- `store`: the tracking URI, a client, the checks before a search, batched writes;
- `tags`: what ssl-tune writes on its runs and reads back;
- `writer`, `trial_logger`: the driver's record of each trial;
- `search_run`: the search's parent run, its best trial and its confirmation stage;
- `artifacts`: checkpoints read back, figures logged;
- `lookup`: a search found by name or id, its leaderboard and confirmation table.
"""

from ssl_tune.tracking.artifacts import checkpoint_of, checkpoint_on_disk, log_search_figures, log_trial_figures
from ssl_tune.tracking.lookup import (best_per_method, best_trial_run_id, child_runs, confirmation_columns,
                                      confirmation_table, find_parent_run, format_table, leaderboard, list_searches,
                                      objective_of, search_reference, searches_named)
from ssl_tune.tracking.search_run import (close_search_run, close_unfinished, open_search_run, record_confirmation,
                                      record_warm_start, reopen_search_run)
from ssl_tune.tracking.store import (DEFAULT_TRACKING_URI, check_reachable, client_for,
                                     existing_store_client, experiment_id, fluent_tracking_uri, log_metrics,
                                     log_params, resolve_uri)
from ssl_tune.tracking.tags import (ENDED, FAILED, FINISHED, INTERRUPTED, KIND_CONFIRMATION, KIND_TRIAL, RUNNING,
                                    STOPPED, TAG_BEATS_DEFAULT, TAG_BEST_TRIAL_RUN, TAG_CHECKPOINT,
                                    TAG_CHECKPOINT_ARTIFACT, TAG_CHECKPOINT_EPOCH, TAG_CONFIRMATION_TRIALS,
                                    TAG_CONFIRMS, TAG_DAMAGED_CHECKPOINT, TAG_EPOCHS_LOST, TAG_ERROR,
                                    TAG_INTERRUPTED_AT, TAG_KIND, TAG_LAST_RESTART, TAG_METHOD, TAG_METRIC, TAG_MODE,
                                    TAG_ORIGIN, TAG_RANK_TRANSFER, TAG_RESTARTS, TAG_REUSED_FROM, TAG_ROUND,
                                    TAG_IDENTITY,
                                    TAG_SEARCHED, TAG_SEED, TAG_STAGE, TAG_STOPPED_AT, TAG_STORAGE,
                                    TAG_TRIAL_ID, TAG_VERDICT, TAG_WARM_START, trial_status)
from ssl_tune.tracking.trial_logger import MlflowTrialLogger, result_metrics
from ssl_tune.tracking.writer import MlflowWriter, final_flush_s, updates_given_up

__all__ = [
    "DEFAULT_TRACKING_URI", "ENDED", "FAILED", "FINISHED", "INTERRUPTED", "RUNNING", "STOPPED", "trial_status",
    "KIND_CONFIRMATION", "KIND_TRIAL", "MlflowTrialLogger", "MlflowWriter",
    "TAG_BEATS_DEFAULT", "TAG_BEST_TRIAL_RUN", "TAG_CHECKPOINT", "TAG_CHECKPOINT_ARTIFACT", "TAG_CHECKPOINT_EPOCH",
    "TAG_CONFIRMATION_TRIALS", "TAG_CONFIRMS", "TAG_DAMAGED_CHECKPOINT", "TAG_EPOCHS_LOST", "TAG_ERROR",
    "TAG_INTERRUPTED_AT", "TAG_KIND", "TAG_LAST_RESTART", "TAG_METHOD", "TAG_METRIC", "TAG_MODE", "TAG_ORIGIN",
    "TAG_RANK_TRANSFER", "TAG_RESTARTS", "TAG_REUSED_FROM", "TAG_ROUND", "TAG_IDENTITY",
    "TAG_SEARCHED", "TAG_SEED", "TAG_STAGE", "TAG_STOPPED_AT", "TAG_STORAGE", "TAG_TRIAL_ID", "TAG_VERDICT", "TAG_WARM_START",
    "best_per_method", "best_trial_run_id", "check_reachable", "checkpoint_of",
    "checkpoint_on_disk", "child_runs", "client_for", "close_search_run", "close_unfinished", "confirmation_columns",
    "confirmation_table", "existing_store_client", "experiment_id", "final_flush_s", "find_parent_run",
    "fluent_tracking_uri", "format_table", "leaderboard", "list_searches", "log_metrics", "log_params",
    "log_search_figures", "log_trial_figures",
    "objective_of", "open_search_run", "record_confirmation", "record_warm_start", "reopen_search_run", "resolve_uri",
    "result_metrics", "search_reference", "searches_named",
    "updates_given_up",
]
