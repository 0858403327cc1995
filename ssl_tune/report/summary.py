"""What ssl-tune prints about a search's trials, when it ends (`run`, `resume`) and when asked (`results`): the
leaderboard, each method's best, the confirmation table and its verdict, and the commands that go on from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssl_tune.report.shell import ssl_tune_command


def print_trials(rows: list[dict], mode: str, confirmation: list[dict], verdict: str) -> None:
    """The leaderboard, each method's best (a search across methods), and the confirmation stage's table."""
    from ssl_tune import tracking

    print(tracking.format_table(rows, _leaderboard_columns(rows)))
    _print_best_per_method(rows, mode)
    _print_confirmation(confirmation, verdict)


def print_next_steps(outcome: Any, uri_args: list[str]) -> None:
    """The commands to browse the finished search and export its best backbone (`uri_args`: `--tracking-uri X`
    where the store is not the default)."""
    name = reference(outcome)
    export_dir = Path("exports") / name
    print(f"browse the search:         {ssl_tune_command('ui', *uri_args)}")
    print(f"export the best backbone:  {ssl_tune_command('export', name, *uri_args)}")
    print(f"then load it in Python:    backbone, preprocess = ssl_tune.load_backbone({str(export_dir)!r})")


def reference(outcome) -> str:
    """The search as the printed commands name it: its name while no other search has it, else its run id; the run
    id too where the store cannot say (the search has ended: a printed hint never fails the command)."""
    from ssl_tune import tracking
    from ssl_tune.searching.replay import tracking_errors

    try:
        return tracking.search_reference(tracking.client_for(outcome.tracking_uri), outcome.parent_run_id)
    except tracking_errors():
        return outcome.parent_run_id


def _print_best_per_method(rows: list[dict], mode: str) -> None:
    """A search across methods: each method's best trial."""
    from ssl_tune import tracking

    per_method = tracking.best_per_method(rows, mode)
    if len(per_method) > 1:
        print("\nbest trial per method:")
        print(tracking.format_table(per_method, _leaderboard_columns(per_method)))


def _print_confirmation(rows: list[dict], verdict: str) -> None:
    """The confirmation stage's table (seeds, mean, SD, 95% interval, gain over the default, who left the race) and
    verdict."""
    from ssl_tune import tracking
    from ssl_tune.searching.confirmation import rank_transfer, rank_transfer_line

    if rows or verdict:
        print("\nconfirmed on fresh seeds (best mean first; export takes the first row's best seed):")
        print(tracking.format_table(rows, tracking.confirmation_columns(rows)))
        print(verdict)
        transfer = rank_transfer_line(rank_transfer(rows))
        if transfer:
            print(transfer)


def _leaderboard_columns(rows: list[dict]) -> list[str]:
    return [c for c in (rows[0] if rows else {}) if c not in ("run_id", "trial_id")]
