"""Sweep specs: load and validate the YAML, expand the grid into resolved trials with stable keys.

Everything is validated here, before Ray or MLflow is touched: a bad spec exits 2 with a message
naming the field path and the value, and nothing is started or written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.attention import schedule_string
from trainer.config import (
    ConfigError,
    TrialConfig,
    apply_overrides,
    build_config,
    flatten,
    format_validation_error,
    load_yaml,
    parse_override,
    set_dotted,
)


class SpecError(ValueError):
    """The spec cannot run as written; the message names the field path and the bad value."""


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cpu: float = Field(1.0, gt=0, description="CPUs per trial.")
    gpu: float = Field(0.0, ge=0, description="GPUs per trial; a fraction packs several trials on one GPU.")

    @field_validator("gpu")
    @classmethod
    def _whole_or_fraction(cls, gpu: float) -> float:
        if gpu > 1 and gpu != int(gpu):
            raise ValueError(f"gpu above 1 must be a whole number, got {gpu}")
        return gpu


class Compare(BaseModel):
    """How `ditsweep report` pairs trials: each configuration against the baseline configuration at the
    same other axis values, trial by trial on the `pair_on` axes (see orchestrator.compare)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    baseline: dict[str, Any] = Field(
        default_factory=lambda: {"attention.placement": "none"},
        description="Grid axis -> value that makes a trial a baseline (default: global attention).",
    )
    pair_on: list[str] = Field(
        default_factory=lambda: ["seed", "data.shuffle_seed"],
        description="Axes a trial and its baseline share (matched pairs); averaged over, never a configuration.",
    )


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, description="MLflow experiment name.")
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict, description="A partial trial config shared by all trials.")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted key -> values (cartesian product).")
    resources: Resources = Resources()
    max_failures: int = Field(0, ge=0, description="Retries per trial, each resuming from its last checkpoint.")
    compare: Compare = Field(default_factory=Compare, description="The report's paired comparison.")

    @field_validator("grid")
    @classmethod
    def _axes_not_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"axis grid.{key} is empty; give it at least one value")
            encoded = [json.dumps(v, sort_keys=True) for v in values]
            if len(set(encoded)) != len(encoded):
                raise ValueError(f"axis grid.{key} repeats a value: {values}")
        return grid

    @model_validator(mode="after")
    def _compare_names_grid_values(self) -> "SweepSpec":
        """A `compare` written in the spec must name grid axes and values (the default may not apply)."""
        if "compare" not in self.model_fields_set:
            return self
        for key, value in self.compare.baseline.items():
            if key not in self.grid:
                raise ValueError(f"compare.baseline names {key!r}, which is not a grid axis ({', '.join(self.grid)})")
            if json.dumps(value, sort_keys=True) not in {json.dumps(v, sort_keys=True) for v in self.grid[key]}:
                raise ValueError(f"compare.baseline.{key} is {value!r}, not one of grid.{key}: {self.grid[key]}")
        for key in self.compare.pair_on:
            if key in self.compare.baseline:
                raise ValueError(f"compare.pair_on names {key!r}, which compare.baseline fixes")
        return self


@dataclass(frozen=True)
class Trial:
    """One grid point: its axis values, the resolved config and the key that identifies its result."""

    axes: dict[str, Any]
    config: TrialConfig
    key: str

    @property
    def name(self) -> str:
        return run_name(self.axes)

    @property
    def params(self) -> dict[str, Any]:
        """The trial's MLflow params: every flattened config key, plus its resolved attention schedule."""
        return {**flatten(self.config), "attention.schedule": self.config.schedule}


def trial_key(config: TrialConfig) -> str:
    """sha256 of the normalized resolved config: equal configs, equal keys, whatever the YAML spelling."""
    normalized = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(normalized.encode()).hexdigest()


_SHORT_LABELS = {
    "data.num_images": "N",
    "data.fraction": "f",
    "seed": "s",
    "data.shuffle_seed": "sh",
    "train.steps": "T",
    "attention.windows": "w",
}


def axis_label(key: str, value: Any) -> str:
    if isinstance(value, list):
        value = schedule_string(value).replace(",", "-")
    if key in _SHORT_LABELS:
        return f"{_SHORT_LABELS[key]}{value}"
    if key in ("attention.placement", "model.size"):
        return str(value)
    return f"{key.rsplit('.', 1)[-1]}={value}"


def run_name(axes: dict[str, Any]) -> str:
    """A readable run name from the axis values, e.g. `head·N1000·s0`."""
    return "·".join(axis_label(k, v) for k, v in axes.items()) or "trial"


# ---------------------------------------------------------------------------------------------


def load_spec(path: str | Path) -> SweepSpec:
    try:
        raw = load_yaml(path)
    except ConfigError as err:
        raise SpecError(str(err)) from None
    return _validate_spec(raw, f"'{path}'")


def parse_spec(text: str, source: str = "spec") -> SweepSpec:
    """A spec from YAML text (e.g. the copy stored with a sweep's MLflow run)."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise SpecError(f"{source} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{source} must hold a mapping, got {type(raw).__name__}")
    return _validate_spec(raw, source)


def _validate_spec(raw: dict, source: str) -> SweepSpec:
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(f"invalid spec {source}:\n{format_validation_error(err)}") from None


def _resolve(tree: dict, where: str) -> TrialConfig:
    try:
        return build_config(tree)
    except ConfigError as err:
        raise SpecError(f"{where}:\n{err}") from None


def expand(spec: SweepSpec, overrides: list[str] = ()) -> list[Trial]:
    """Resolve and validate every trial of the grid up front, in a stable order."""
    base = _base_tree(spec, list(overrides))
    axes = list(spec.grid)
    for key in axes:  # one axis value at a time first, so an error names exactly that value
        for value in spec.grid[key]:
            tree = json.loads(json.dumps(base))
            _set_axis(tree, key, value)
            _resolve(tree, f"grid.{key}: value {value!r} is not valid")
    trials: list[Trial] = []
    for values in itertools.product(*(spec.grid[k] for k in axes)):
        point = dict(zip(axes, values))
        tree = json.loads(json.dumps(base))
        for key, value in point.items():
            _set_axis(tree, key, value)
        where = "grid point " + ", ".join(f"{k}={v!r}" for k, v in point.items())
        config = _resolve(tree, f"{where} is not valid")
        trials.append(Trial(axes=point, config=config, key=trial_key(config)))
    _refuse_duplicates(trials)
    return trials


def _base_tree(spec: SweepSpec, overrides: list[str]) -> dict:
    for item in overrides:
        key, _ = parse_override(item)
        if key in spec.grid:
            raise SpecError(f"--set {key}=... overrides grid axis '{key}'; change the grid instead")
    try:
        base = apply_overrides(spec.base, overrides)
        _resolve_partial(base)
    except ConfigError as err:
        raise SpecError(f"base: {err}") from None
    return base


def _resolve_partial(base: dict) -> None:
    """Unknown keys in `base` are reported with their path, before any grid value is tried."""
    for dotted, value in flatten(base).items():
        set_dotted({}, dotted, value)


def _set_axis(tree: dict, key: str, value: Any) -> None:
    try:
        set_dotted(tree, key, value)
    except ConfigError as err:
        raise SpecError(f"grid.{key}: {err}") from None


def _refuse_duplicates(trials: list[Trial]) -> None:
    seen: dict[str, Trial] = {}
    for trial in trials:
        if trial.key in seen:
            raise SpecError(
                f"grid points {seen[trial.key].name!r} and {trial.name!r} resolve to the same config "
                "(an axis has no effect under the other values, e.g. windows with placement 'none'); "
                "split the spec or drop the redundant values"
            )
        seen[trial.key] = trial
