"""Sweep specs: load and validate the YAML, expand the grid into resolved trials with stable keys.

Everything is validated here, before Ray or MLflow is touched: a bad spec exits 2 with a message
naming the field path and the value, and nothing is started or written.

Over 400 lines and still one job: a spec from its text to resolved trials. The schema, the expansion
of the grid and the blame of an invalid grid point (a --set, the base, or the axis value) work on the
same trees and the same limits of what MLflow keeps; apart they would pass those between modules.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.display import param_text
from trainer.schedule import schedule_string
from trainer.bounded_yaml import load_yaml, parse_yaml_mapping
from trainer.config import TrialConfig, build_config, flatten, parse_override, set_dotted
from trainer.messages import ConfigError, format_validation_error, short_path, short_repr, short_text


# What MLflow keeps (mlflow/store/tracking/dbmodels/models.py, mlflow/utils/validation.py): beyond these
# it refuses a write mid-sweep or cuts the value, so a spec is refused here, before anything is written.
MLFLOW_EXPERIMENT_NAME_MAX_CHARS = 256  # the experiments table's column (the spec's `name`)
MLFLOW_RUN_NAME_MAX_CHARS = 250  # the runs table's column (a trial's name is cut to it)
MLFLOW_PARAM_MAX_CHARS = 6000  # a param's value (every resolved config value of a trial)
MLFLOW_TAG_MAX_CHARS = 8000  # a run tag's value (the description, the --set options, --storage)


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
        description="Grid axis -> value that makes a trial a baseline (default: global attention); {} for no paired comparison.",
    )
    pair_on: list[str] = Field(
        default_factory=lambda: ["seed", "data.shuffle_seed"],
        description="Axes a trial and its baseline share (matched pairs); averaged over, never a configuration.",
    )


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=MLFLOW_EXPERIMENT_NAME_MAX_CHARS, description="MLflow experiment name.")
    description: str = Field("", max_length=MLFLOW_TAG_MAX_CHARS, description="The sweep run's note in MLflow.")
    base: dict[str, Any] = Field(default_factory=dict, description="A partial trial config shared by all trials.")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted key -> values (cartesian product).")
    exclude: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Grid points left out: each entry maps grid axes to one of their values, and a point that has "
        "all of an entry's values is dropped (e.g. `{model.arch: unet, attention.placement: head}`: a UNet has no "
        "attention windows).",
    )
    resources: Resources = Resources()
    max_failures: int = Field(0, ge=0, description="Retries per trial, each resuming from its last checkpoint.")
    compare: Compare = Field(default_factory=Compare, description="The report's paired comparison.")

    @field_validator("grid")
    @classmethod
    def _axes_not_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"axis grid.{short_text(key, 100)} is empty; give it at least one value")
            encoded = [json.dumps(v, sort_keys=True) for v in values]
            if len(set(encoded)) != len(encoded):
                raise ValueError(f"axis grid.{short_text(key, 100)} repeats a value: {short_repr(values)}")
        return grid

    @model_validator(mode="after")
    def _exclude_names_grid_values(self) -> "SweepSpec":
        for i, entry in enumerate(self.exclude):
            if not entry:
                raise ValueError(f"exclude[{i}] is empty; name at least one grid axis and value")
            for key, value in entry.items():
                if key not in self.grid:
                    raise ValueError(f"exclude[{i}] names {short_repr(key)}, which is not a grid axis "
                                     f"({short_text(', '.join(self.grid), 200)})")
                if json.dumps(value, sort_keys=True) not in {json.dumps(v, sort_keys=True) for v in self.grid[key]}:
                    raise ValueError(f"exclude[{i}].{short_text(key, 100)} is {short_repr(value)}, not one of "
                                     f"grid.{short_text(key, 100)}: {short_repr(self.grid[key])}")
        return self

    def excluded(self, point: dict[str, Any]) -> bool:
        """True when the grid point has every value of one `exclude` entry."""
        return any(all(json.dumps(point[k], sort_keys=True) == json.dumps(v, sort_keys=True) for k, v in entry.items())
                   for entry in self.exclude)

    @model_validator(mode="after")
    def _compare_names_grid_values(self) -> "SweepSpec":
        """A `compare` written in the spec must name grid axes and values (the default may not apply:
        `expand` checks that it matches a trial)."""
        if "compare" not in self.model_fields_set:
            return self
        for key, value in self.compare.baseline.items():
            if key not in self.grid:
                raise ValueError(f"compare.baseline names {short_repr(key)}, which is not a grid axis ({short_text(', '.join(self.grid), 200)})")
            if json.dumps(value, sort_keys=True) not in {json.dumps(v, sort_keys=True) for v in self.grid[key]}:
                raise ValueError(f"compare.baseline.{short_text(key, 100)} is {short_repr(value)}, not one of grid.{short_text(key, 100)}: {short_repr(self.grid[key])}")
        for key in self.compare.pair_on:
            if key in self.compare.baseline:
                raise ValueError(f"compare.pair_on names {short_repr(key)}, which compare.baseline fixes")
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


# Raised whenever what a trial measures changes for the same config (2: the PSNR gap scores a uniform
# sample of the held-out set, not its lowest indices): a store's cached trials of an older measurement
# then no longer match any key and are run again instead of being mixed with new ones.
MEASUREMENT = 2


def trial_key(config: TrialConfig) -> str:
    """sha256 of the normalized resolved config and the MEASUREMENT it is measured by: equal configs, equal
    keys, whatever the YAML spelling."""
    normalized = json.dumps({"config": config.model_dump(mode="json"), "measurement": MEASUREMENT},
                            sort_keys=True, separators=(",", ":"))
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
    if key in ("attention.placement", "model.size", "model.arch"):
        return str(value)
    return f"{key.rsplit('.', 1)[-1]}={value}"


def run_name(axes: dict[str, Any]) -> str:
    """A readable run name from the axis values, e.g. `head·N1000·s0`, cut to what MLflow keeps."""
    return ("·".join(axis_label(k, v) for k, v in axes.items()) or "trial")[:MLFLOW_RUN_NAME_MAX_CHARS]


# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Sweep ids: made from the spec's name; a search filter and folder names are built from them.


SWEEP_ID_PATTERN = re.compile(r"[\w-]{1,100}")  # what new_sweep_id makes: no quote, slash, dot or space


def check_sweep_id(sweep_id: str) -> None:
    """A sweep id goes into a search filter and a folder name: refuse anything new_sweep_id cannot make."""
    if not SWEEP_ID_PATTERN.fullmatch(sweep_id):
        raise SpecError(f"{short_repr(sweep_id)} is not a sweep id (letters, digits and '-', at most 100, e.g. "
                        "placement-20250101-120000-ab12); `ditsweep status` lists them")


def new_sweep_id(name: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40] or "sweep"
    return f"{slug}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


# ---------------------------------------------------------------------------------------------


def load_spec(path: str | Path) -> SweepSpec:
    try:
        raw = load_yaml(path)
    except ConfigError as err:
        raise SpecError(str(err)) from None
    return _validate_spec(raw, short_path(path))


def parse_spec(text: str, source: str = "spec") -> SweepSpec:
    """A spec from YAML text (e.g. the copy stored with a sweep's MLflow run)."""
    try:
        raw = parse_yaml_mapping(text, source)
    except ConfigError as err:
        raise SpecError(str(err)) from None
    return _validate_spec(raw, source)


def _validate_spec(raw: dict, source: str) -> SweepSpec:
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(f"invalid spec {source}:\n{format_validation_error(err)}") from None


def expand(spec: SweepSpec, overrides: list[str] = ()) -> list[Trial]:
    """Resolve and validate every trial of the grid up front, in a stable order.

    An invalid config is blamed on what made it invalid: a `--set` (when the same grid point is valid
    without it), else the spec's base (when it is invalid whatever the axis value), else the axis value.
    """
    items = list(overrides)
    pairs = parse_overrides(spec, items)
    base = _base_tree(spec, pairs)
    axes = list(spec.grid)
    for key in axes:  # one axis value at a time first, so an error names exactly that value
        for value in spec.grid[key]:
            where = f"grid.{short_text(key, 100)}: value {short_repr(value)} is not valid"
            _point_config(spec, base, pairs, {key: value}, where)
    trials: list[Trial] = []
    for values in itertools.product(*(spec.grid[k] for k in axes)):
        point = dict(zip(axes, values))
        if spec.excluded(point):
            continue
        where = "grid point " + ", ".join(f"{short_text(k, 100)}={short_repr(v)}" for k, v in point.items()) if point else "base"
        config = _point_config(spec, base, pairs, point, f"{where} is not valid")
        trials.append(Trial(axes=point, config=config, key=trial_key(config)))
    _refuse_duplicates(trials)
    _refuse_unmatched_baseline(spec, trials)
    _refuse_what_mlflow_cannot_keep(trials, items)
    return trials


@dataclass(frozen=True)
class Override:
    """One `--set` parsed once: the dotted key, its value (a YAML scalar or list) and the text typed."""

    key: str
    value: Any
    text: str


def parse_overrides(spec: SweepSpec, items: list[str]) -> list[Override]:
    """Each `--set` item parsed once, its key checked against the config schema and the grid (an axis
    is changed in the grid, not with --set); every grid point then applies the parsed pairs."""
    pairs = []
    for item in items:
        try:
            key, value = parse_override(item)
            set_dotted({}, key, value)
        except ConfigError as err:
            raise SpecError(str(err) if str(err).startswith("--set") else f"--set {short_text(item, 100)}: {err}") from None
        if key in spec.grid:
            raise SpecError(f"--set {short_text(key, 100)}=... overrides grid axis {short_repr(key)}; change the grid instead")
        pairs.append(Override(key, value, item))
    return pairs


def _refuse_unmatched_baseline(spec: SweepSpec, trials: list[Trial]) -> None:
    """A written baseline must match a trial left after `exclude`; the default one (global attention)
    must match a trial when the grid varies attention or the baseline's own axis (over two or more
    values). Otherwise the report's paired table would be empty, silently (a grid over, say, the
    learning rate alone has nothing to compare). `compare: {baseline: {}}` asks for no paired table."""
    baseline = spec.compare.baseline
    if not baseline:
        return
    if "compare" in spec.model_fields_set:  # its values are grid values (checked when the spec is read)
        wanted = {k: json.dumps(v, sort_keys=True) for k, v in baseline.items()}
        if not any(all(json.dumps(t.axes.get(k), sort_keys=True) == v for k, v in wanted.items()) for t in trials):
            named = ", ".join(f"{k} = {short_repr(v)}" for k, v in baseline.items())
            raise SpecError(f"compare.baseline ({short_text(named, 300)}) matches no trial: `exclude` removes every "
                            f"grid point that has it; keep one, or name another baseline")
        return
    encoded = {k: {json.dumps(x, sort_keys=True) for x in spec.grid.get(k, [])} for k in baseline}
    if all(json.dumps(v, sort_keys=True) in encoded[k] for k, v in baseline.items()):
        return
    # Only an axis with several values implies a comparison: a grid of head windows alone has none to make.
    compared = [a for a in spec.grid if a in baseline or a.startswith("attention.")]
    if any(len(spec.grid[a]) > 1 for a in compared):
        wanted = ", ".join(f"{k} = {short_repr(v)}" for k, v in baseline.items())
        raise SpecError(
            f"the default compare baseline ({wanted}) matches no trial of the grid "
            f"({short_text(', '.join(spec.grid), 200)}); add `compare: {{baseline: {{AXIS: VALUE}}}}` naming the "
            f"grid value to compare against (or `compare: {{baseline: {{}}}}` for no paired table)"
        )



def _refuse_what_mlflow_cannot_keep(trials: list[Trial], overrides: list[str]) -> None:
    """A config value longer than an MLflow param, or --set options longer than the sweep's tag."""
    if len(json.dumps(overrides)) > MLFLOW_TAG_MAX_CHARS:
        raise SpecError(f"the --set options are {len(json.dumps(overrides))} characters together; MLflow keeps at "
                        f"most {MLFLOW_TAG_MAX_CHARS} in the sweep's tag: put them in the spec's base instead")
    for trial in trials:
        for key, value in trial.params.items():
            if len(text := param_text(value)) > MLFLOW_PARAM_MAX_CHARS:
                raise SpecError(f"{key}={short_repr(value)} is {len(text)} characters as an MLflow param; "
                                f"MLflow keeps at most {MLFLOW_PARAM_MAX_CHARS}")


def check_tag_value(option: str, value: str | None) -> None:
    """A command-line value kept as a run tag (e.g. --storage, which `resume` reads back)."""
    if value is not None and len(value) > MLFLOW_TAG_MAX_CHARS:
        raise SpecError(f"{option} is {len(value)} characters; MLflow keeps at most {MLFLOW_TAG_MAX_CHARS} "
                        f"in the sweep's tag: {short_repr(value)}")


def _point_config(spec: SweepSpec, base: dict, pairs: list[Override], point: dict[str, Any],
                  where: str) -> TrialConfig:
    """The config of one grid point: `base` (the spec's base with every --set applied) and the point's
    axis values. An invalid one is blamed on a --set, the base, or the point (see `expand`)."""
    try:
        return build_config(_with_axes(base, point))
    except ConfigError as err:
        culprit = _culprit_override(spec, pairs, point)
        if culprit is not None:
            raise SpecError(f"--set {short_text(culprit.text, 100)}: {err}") from None
        if point and _fails_alike(spec, err):
            raise SpecError(f"base: {err}") from None
        raise SpecError(f"{where}:\n{err}") from None


def _with_axes(tree: dict, point: dict[str, Any]) -> dict:
    tree = copy.deepcopy(tree)
    for key, value in point.items():
        _set_axis(tree, key, value)
    return tree


def _culprit_override(spec: SweepSpec, pairs: list[Override], point: dict[str, Any]) -> Override | None:
    """The first `--set` whose addition turns this grid point invalid; None when it is invalid without any.
    Only on the error path: the pairs are added to one tree one at a time, each prefix validated once."""
    tree = copy.deepcopy(spec.base)
    for added in (None, *pairs):
        if added is not None:
            set_dotted(tree, added.key, added.value)
        try:
            build_config(_with_axes(tree, point))
        except ConfigError:
            return added
    return None


def _fails_alike(spec: SweepSpec, err: ConfigError) -> bool:
    """True when the spec's base alone (no axis value, no --set) fails with the same message: then the base,
    not the axis value, is wrong."""
    try:
        build_config(spec.base)
    except ConfigError as base_err:
        return str(base_err) == str(err)
    return False


def _base_tree(spec: SweepSpec, pairs: list[Override]) -> dict:
    """The spec's base with every --set applied; unknown keys of the base are reported with their path."""
    try:
        _resolve_partial(spec.base)
    except ConfigError as err:
        raise SpecError(f"base: {err}") from None
    tree = copy.deepcopy(spec.base)
    for override in pairs:
        set_dotted(tree, override.key, override.value)
    return tree


def _resolve_partial(base: dict) -> None:
    """Unknown keys in `base` are reported with their path, before any grid value is tried."""
    for dotted, value in flatten(base).items():
        set_dotted({}, dotted, value)


def _set_axis(tree: dict, key: str, value: Any) -> None:
    try:
        set_dotted(tree, key, value)
    except ConfigError as err:
        raise SpecError(f"grid.{short_text(key, 100)}: {err}") from None


def _refuse_duplicates(trials: list[Trial]) -> None:
    seen: dict[str, Trial] = {}
    for trial in trials:
        if trial.key in seen:
            raise SpecError(
                f"grid points {short_repr(seen[trial.key].name)} and {short_repr(trial.name)} resolve to the same config "
                "(an axis has no effect under the other values, e.g. windows with placement 'none'); "
                "split the spec or drop the redundant values"
            )
        seen[trial.key] = trial
