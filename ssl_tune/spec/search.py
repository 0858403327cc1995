"""The `search` section of a spec: the objective, the sampler, ASHA, warm start and the confirmation stage,
and what `search.confirm.overrides` makes of the whole spec."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from ssl_tune.spec.ranges import SpecError, StrictModel, set_path

# (The functions take a whole spec, `ssl_tune.spec.SpecBase`, which imports this module: typed Any here.)
SpecBase = Any

# Metrics reported after every evaluated epoch, so a scheduler can compare trials on them. `rankme`
# needs no labels: the effective rank of the training split's representations (RankMe, Garrido et al. 2023).
OBJECTIVES = ("knn_top1", "knn_top5", "rankme", "loss")


class ConfirmSpec(StrictModel):
    """After the search: re-train the best configurations and the default on fresh seeds, at the spec's
    setting or at the full setting `overrides` gives; raced over seeds (`ssl_tune.searching.racing`)."""

    top_k: Annotated[int, Field(ge=0)] = Field(
        0, description="best configurations of the search re-trained at the full budget; 0: no confirmation stage")
    seeds: Annotated[int, Field(ge=2)] = Field(
        8, description="the most fresh training seeds any confirmed configuration gets (at least 2, for a standard "
        "deviation); with racing: false, every configuration gets this many")
    racing: bool = Field(
        True, description="add seeds in rounds, one a round after the first min_seeds: configurations below the "
        "leader beyond noise leave, and the race stops once the winner's gain over the default is decided; false: "
        "every configuration trained on all `seeds` at once")
    min_seeds: Annotated[int, Field(ge=2)] = Field(2, description="racing: the seeds of the first round")
    default: bool = Field(True, description="also re-train the spec's default configuration, the baseline to beat")
    reuse: bool = Field(
        True, description="count a finished confirmation run of the same setting, values, seed and ssl-tune version "
        "from anywhere in the tracking store (an earlier search's default, say) instead of training it again")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="spec fields set for every confirmation trial (the default's too), e.g. "
        "{training.epochs: 100, data.subset: null}: search at a cheap proxy, confirm at the full setting. Searched "
        "fields cannot be overridden: the confirmation trains the search's values")

    @model_validator(mode="after")
    def _min_seeds_within_seeds(self) -> ConfirmSpec:
        if self.min_seeds > self.seeds:
            raise ValueError(f"min_seeds ({self.min_seeds}) is more than seeds ({self.seeds}), the most any "
                             "configuration gets")
        return self


# `search.sampler`: Optuna's samplers by name (`ssl_tune.searching.algorithms.build_sampler`).
SAMPLERS = ("tpe", "gp", "cmaes", "qmc", "random")


class SearchSpec(StrictModel):
    num_samples: Annotated[int, Field(ge=1)] = 8
    max_concurrent: Annotated[int, Field(ge=1)] | None = Field(
        None, description="trials at once; default: as many as the cluster's CPUs/GPUs fit"
    )
    metric: Literal[OBJECTIVES] = Field("knn_top1", description="objective")  # type: ignore[valid-type]  # a tuple's values
    mode: Literal["max", "min"] = "max"
    sampler: Literal[SAMPLERS] = Field(  # type: ignore[valid-type]  # (the same)
        "tpe", description="Optuna sampler: tpe (tree-structured Parzen), gp (Gaussian process, for small budgets), "
        "cmaes (CMA-ES; choices sampled at random), qmc (quasi-random Sobol points), or random (a baseline)")
    startup_trials: Annotated[int, Field(ge=1)] | None = Field(
        None, description="tpe, gp, cmaes: trials sampled at random before the sampler models the results (warm-start "
        "observations count); default: 2 per searched parameter, at most 10 (Optuna's default)")
    scheduler: Literal["asha", "none"] = Field("asha", description="asha: early stopping of weak trials")
    grace_period: Annotated[int, Field(ge=1)] | None = Field(
        None, description="ASHA: epochs before a trial can be stopped (its first decision, at the first evaluated "
        "epoch from there); default: the warm-up's epochs plus one, so that no trial is cut during its warm-up")
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0
    seed: int = Field(0, description="seed of Optuna's sampler")
    max_failures: Annotated[int, Field(ge=0)] = Field(
        2, description="restarts of a trial whose worker died, each from its latest checkpoint")
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="trials to run first, e.g. [{method.tau: 0.5}]"
    )
    warm_start: list[str] = Field(
        default_factory=list, description="earlier searches in the tracking store (name or parent run id): their "
        "finished trials of the same setting are told to the sampler without retraining; a search of another "
        "setting gives its best configuration, tried first")
    confirm: ConfirmSpec = ConfirmSpec()


def check_confirm_overrides(spec: SpecBase) -> None:
    """Raise ValueError, in one line, for an override that names no field, a search setting, a searched field
    (the confirmation trains the search's values), or a value its field refuses."""
    searched = spec.searchable_paths()
    for path in spec.search.confirm.overrides:
        if path.split(".")[0] not in type(spec).model_fields:
            raise ValueError(f"search.confirm.overrides: {path!r} is not a spec field")
        if path.split(".")[0] == "search":
            raise ValueError(f"search.confirm.overrides: {path}: the search's own settings do not change a trial")
        clash = [p for p in searched if p == path or p.startswith(path + ".")]
        if clash:
            raise ValueError(f"search.confirm.overrides: {path} is searched ({', '.join(clash)}); the confirmation "
                             "trains the search's values of it")
    confirmation_spec(spec)


def confirmation_spec(spec: SpecBase) -> SpecBase:
    """`spec` with `search.confirm.overrides` set (and emptied), its ranges kept; `spec` itself without overrides."""
    from pydantic import ValidationError

    overrides = spec.search.confirm.overrides
    if not overrides:
        return spec
    raw = spec.model_dump(mode="json")
    raw["search"]["confirm"]["overrides"] = {}  # (set, not to be set again)
    for path, value in overrides.items():
        try:
            set_path(raw, path.split("."), value)
        except SpecError as exc:
            raise ValueError(f"search.confirm.overrides: {exc}") from None
    try:
        return type(spec).model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise ValueError(f"search.confirm.overrides: {where + ': ' if where else ''}{error['msg']}") from None
