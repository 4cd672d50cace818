"""Sweep specs: validation before anything starts, grid expansion, trial keys and run names."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.spec import SpecError, expand, load_spec, run_name, trial_key
from tests.support.sweeps import TINY, tiny_config, write_spec
from trainer.config import build_config

def test_grid_is_the_cartesian_product_in_stable_order(tmp_path):
    path = write_spec(tmp_path, grid={"attention.placement": ["head", "tail"], "data.num_images": [16, 32], "seed": [0, 1]},
                      compare={"baseline": {"attention.placement": "tail"}})
    trials = expand(load_spec(path))
    assert len(trials) == 8
    assert [t.axes for t in trials[:2]] == [
        {"attention.placement": "head", "data.num_images": 16, "seed": 0},
        {"attention.placement": "head", "data.num_images": 16, "seed": 1},
    ]
    assert trials[0].config.attention.placement == "head"
    assert trials[-1].config.data.num_images == 32
    assert trials[-1].config.train.steps == TINY["train"]["steps"]  # the base reaches every trial
    assert len({t.key for t in trials}) == 8


def test_trial_key_is_sha256_of_the_normalized_config():
    a = build_config({"train": {"steps": 5}, "attention": {"windows": [3, 5]}})
    b = build_config({"attention": {"windows": [3, 5]}, "train": {"steps": 5, "lr": 1e-3}})  # lr is the default
    c = build_config({"train": {"steps": 6}, "attention": {"windows": [3, 5]}})
    assert trial_key(a) == trial_key(b)
    assert trial_key(a) != trial_key(c)
    assert len(trial_key(a)) == 64 and int(trial_key(a), 16) >= 0


def test_keys_are_stable_when_an_axis_gains_a_value(tmp_path):
    small = expand(load_spec(write_spec(tmp_path, grid={"data.num_images": [16]})))
    large = expand(load_spec(write_spec(tmp_path, grid={"data.num_images": [16, 32]})))
    assert small[0].key == large[0].key


def test_run_names_are_short_axis_labels():
    assert run_name({"attention.placement": "head", "data.num_images": 1000, "seed": 0}) == "head·N1000·s0"
    assert run_name({"attention.windows": [3, None], "train.lr": 0.001}) == "w3-G·lr=0.001"


def test_set_overrides_the_base_of_every_trial(tmp_path):
    trials = expand(load_spec(write_spec(tmp_path)), ["train.steps=7"])
    assert {t.config.train.steps for t in trials} == {7}


def test_set_may_not_override_a_grid_axis(tmp_path):
    with pytest.raises(SpecError, match="attention.placement"):
        expand(load_spec(write_spec(tmp_path)), ["attention.placement=tail"])


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"grid": {"attention.placement": ["head", "sideways"]}}, "sideways"),
        ({"grid": {"attention.placemnt": ["head"]}}, "placemnt"),
        ({"grid": {"seed": []}}, "grid.seed"),
        ({"grid": {"attention.windows": [[3, 4]]}}, "4"),
        ({"grid": {"data.fraction": [1.5]}}, "1.5"),
        ({"grid": {"train.steps": ["many"]}}, "many"),
        ({"base": {"train": {"stepz": 3}}}, "stepz"),
        ({"resources": {"gpu": -1}}, "resources.gpu"),
        ({"max_failures": -2}, "max_failures"),
        ({"colour": "blue"}, "colour"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_specs_name_the_field_and_value(tmp_path, fields, expected):
    with pytest.raises(SpecError) as err:
        expand(load_spec(write_spec(tmp_path, **fields)))
    assert expected in str(err.value)


def test_too_many_windows_for_the_model_is_refused(tmp_path):
    path = write_spec(tmp_path, grid={"attention.windows": [[3, 5, 7, 9, 11, 13, 3, 5, 7, 9, 11, 13, 3]]})
    with pytest.raises(SpecError, match="13"):
        expand(load_spec(path))


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "absent.yaml")


def test_grid_points_that_resolve_to_the_same_config_are_refused(tmp_path):
    path = write_spec(tmp_path, grid={"train.steps": [2, 2.0]})
    with pytest.raises(SpecError):
        expand(load_spec(path))


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("search_spaces/**/*.yaml")))
def test_shipped_search_spaces_are_valid(path):
    trials = expand(load_spec(path))
    assert trials, path
    spec = load_spec(path)
    assert spec.description.strip(), f"{path} needs a description"


def test_excluded_grid_points_are_left_out_and_bad_entries_refused(tmp_path):
    grid = {"model.arch": ["unet", "dit"], "attention.placement": ["none", "head"]}
    base = tiny_config(drop=("model.size",))  # each architecture's default size
    path = write_spec(tmp_path, base=base, grid=grid, exclude=[{"model.arch": "unet", "attention.placement": "head"}])
    trials = expand(load_spec(path))
    assert [t.axes for t in trials] == [{"model.arch": "unet", "attention.placement": "none"},
                                        {"model.arch": "dit", "attention.placement": "none"},
                                        {"model.arch": "dit", "attention.placement": "head"}]
    with pytest.raises(SpecError, match="attention.placement must be 'none'"):  # without it: the UNet refuses windows
        expand(load_spec(write_spec(tmp_path, base=base, grid=grid)))
    with pytest.raises(SpecError, match=r"exclude\[0\] names 'seed', which is not a grid axis"):
        load_spec(write_spec(tmp_path, base=base, grid=grid, exclude=[{"seed": 0}]))
    with pytest.raises(SpecError, match=r"exclude\[0\].model.arch is 'cnn', not one of"):
        load_spec(write_spec(tmp_path, base=base, grid=grid, exclude=[{"model.arch": "cnn"}]))
