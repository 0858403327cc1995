"""The spec: a typed schema for what to train and which hyperparameters to search, one module per part.

- `ranges`: the search ranges a field may hold (``Searchable[...]``: a value or a range) and `SpecError`;
- `data`: the data section and its view augmentations;
- `search`: the search section (sampler, ASHA, the confirmation stage and its overrides);
- `schema`: the other sections and `SpecBase`, the whole spec (its ranges, `resolve`, its digest);
- `files`: reading spec files, with `--set` overrides and `extends` (above the method registry, `trainers`);
- `reference`: the reference page generated from the schema (docs/spec.md).

``from ssl_tune.spec import X`` names every part of the schema; `files` and `reference` sit above the method
registry, which sits above the schema, and are imported by their own names.
"""

from ssl_tune.spec.data import (MAX_CACHE_SIZE, MAX_IMAGE_SIZE, RESIDENT_FRACTION, AugmentationSpec, DataSpec,
                                Probability, ViewStrengths)
from ssl_tune.spec.ranges import (RANGE_TYPES, Choice, IntRange, LogUniform, Range, Searchable, SpecError, StrictModel,
                                  Uniform, range_default, set_path)
from ssl_tune.spec.schema import (DEFAULT_BANK_SIZE, BackboneSpec, EvaluationSpec, MethodChoice, MethodConfig,
                                  MlflowSpec, OptimizerSpec, ProjectorSpec, ResourcesSpec, SpecBase, TrainingSpec)
from ssl_tune.spec.search import (OBJECTIVES, SAMPLERS, ConfirmSpec, SearchSpec, check_confirm_overrides,
                                  confirmation_spec)

__all__ = [
    "DEFAULT_BANK_SIZE", "MAX_CACHE_SIZE", "MAX_IMAGE_SIZE", "OBJECTIVES", "RANGE_TYPES", "RESIDENT_FRACTION",
    "SAMPLERS", "AugmentationSpec", "BackboneSpec", "Choice", "ConfirmSpec", "DataSpec", "EvaluationSpec", "IntRange",
    "LogUniform", "MethodChoice", "MethodConfig", "MlflowSpec", "OptimizerSpec", "Probability", "ProjectorSpec",
    "Range", "ResourcesSpec", "SearchSpec", "Searchable", "SpecBase", "SpecError", "StrictModel", "TrainingSpec",
    "Uniform", "ViewStrengths", "check_confirm_overrides", "confirmation_spec", "range_default", "set_path",
]
