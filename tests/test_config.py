"""trainer.config: defaults, the documented keys, validation messages, YAML and `--set` parsing."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trainer.bounded_yaml import load_yaml
from trainer.config import (
    ConfigError,
    TrialConfig,
    apply_overrides,
    build_config,
    flatten,
    load_config,
    parse_override,
    set_dotted,
)

# The keys DESIGN.md promises ("Contracts other parts rely on"); sweeps and MLflow params use them.
DESIGN_KEYS = [
    "model.size",
    "attention.placement",
    "attention.windows",
    "attention.backend",
    "data.source",
    "data.image_size",
    "data.num_images",
    "data.fraction",
    "data.test_images",
    "data.shuffle_seed",
    "train.steps",
    "train.batch_size",
    "train.lr",
    "train.ema",
    "eval.every",
    "eval.psnr_gap.images",
    "eval.psnr_gap.timesteps",
    "eval.fid.enabled",
    "eval.fid.samples",
    "eval.fid.weights",
    "seed",
]


def refused(tree: dict) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(tree)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# defaults and keys


def test_defaults_build_and_match_the_paper_setup():
    config = build_config({})
    assert config == TrialConfig()
    assert config.model.size == "DiT-T/1"
    assert config.attention.placement == "head"
    assert config.attention.windows == [3, 5, 7, 9, 11, 13]
    assert config.schedule == "3,5,7,9,11,13,G,G,G,G,G,G"
    assert config.eval.fid.enabled is False
    assert config.data.num_images is None and config.data.fraction is None


@pytest.mark.parametrize("key", DESIGN_KEYS)
def test_every_design_key_exists_and_can_be_set(key):
    assert key in flatten(TrialConfig())
    tree: dict = {}
    marker = object()  # the --set path accepts the key (its value is checked later, by build_config)
    set_dotted(tree, key, marker)
    node = tree
    for part in key.split("."):  # ... and puts the value where the dotted key says, nowhere else
        assert list(node) == [part], (key, node)
        node = node[part]
    assert node is marker


def test_flatten_gives_dotted_leaves_for_configs_and_dicts():
    flat = flatten(build_config({"attention": {"windows": [3, 5]}, "train": {"steps": 7}}))
    assert flat["attention.windows"] == [3, 5]
    assert flat["train.steps"] == 7
    assert flat["eval.psnr_gap.images"] == 128
    assert not any(isinstance(value, dict) for value in flat.values())
    assert flatten({"a": {"b": {"c": 1}}, "d": 2}) == {"a.b.c": 1, "d": 2}


# ---------------------------------------------------------------------------------------------
# unknown keys


def test_unknown_yaml_key_is_refused_naming_it():
    message = refused({"train": {"stepz": 5}})
    assert "train.stepz" in message


def test_unknown_top_level_section_is_refused_naming_it():
    assert "trainer" in refused({"trainer": {"steps": 5}})


def test_set_dotted_names_the_bad_part_and_lists_choices():
    with pytest.raises(ConfigError) as info:
        set_dotted({}, "train.stepz", 5)
    message = str(info.value)
    assert "'train.stepz'" in message and "'stepz'" in message and "under 'train'" in message
    assert "steps" in message and "batch_size" in message  # the choices


def test_set_dotted_refuses_descending_into_a_value():
    with pytest.raises(ConfigError, match="'train.steps' is not a section"):
        set_dotted({}, "train.steps.max", 5)


def test_set_dotted_builds_nested_dicts():
    tree: dict = {"train": {"lr": 0.5}}
    set_dotted(tree, "eval.psnr_gap.images", 8)
    set_dotted(tree, "train.steps", 3)
    assert tree == {"train": {"lr": 0.5, "steps": 3}, "eval": {"psnr_gap": {"images": 8}}}


def test_apply_overrides_does_not_mutate_its_input():
    tree = {"train": {"steps": 1}}
    out = apply_overrides(tree, ["train.steps=2", "seed=3"])
    assert tree == {"train": {"steps": 1}}
    assert out == {"train": {"steps": 2}, "seed": 3}


# ---------------------------------------------------------------------------------------------
# types and values


@pytest.mark.parametrize(
    ("tree", "field"),
    [
        ({"train": {"steps": "many"}}, "train.steps"),
        ({"train": {"steps": 2.5}}, "train.steps"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"attention": {"windows": 3}}, "attention.windows"),
        ({"attention": {"placement": "sideways"}}, "attention.placement"),
        ({"attention": {"backend": "cudnn"}}, "attention.backend"),
        ({"eval": 5}, "eval"),
        ({"seed": -1}, "seed"),
        ({"train": {"ema": 1.0}}, "train.ema"),
    ],
)
def test_wrong_types_and_ranges_are_refused_naming_the_field(tree, field):
    assert refused(tree).startswith(f"{field}:")


@pytest.mark.parametrize("tree", [{"train": {"steps": True}}, {"attention": {"windows": [3, True]}}])
def test_booleans_are_not_numbers(tree):
    # pydantic's lax mode would read `true` as 1: a 1-step trial or a silent 1x1 window.
    assert "boolean" in refused(tree)


def test_yaml_style_numbers_are_coerced():
    # PyYAML reads `1e-3` (no dot) as a string; the float field still takes it.
    config = build_config(apply_overrides({}, ["train.lr=1e-3", "train.steps=5"]))
    assert config.train.lr == pytest.approx(0.001)
    assert config.train.steps == 5


@pytest.mark.parametrize("window", [4, 0, -3])
def test_even_zero_and_negative_windows_are_refused_naming_the_value(window):
    message = refused({"attention": {"windows": [3, window]}})
    assert "attention.windows" in message
    assert f"got {window}" in message


def test_too_many_windows_are_refused():
    message = refused({"attention": {"windows": [3] * 13}})
    assert "13 windows" in message and "12-block" in message


def test_mix_allows_only_every_other_block():
    build_config({"attention": {"placement": "mix", "windows": [3] * 6}})
    assert "at most 6" in refused({"attention": {"placement": "mix", "windows": [3] * 7}})


def test_custom_placement_needs_one_entry_per_block():
    windows = [3, None, 5] + [None] * 9
    assert build_config({"attention": {"placement": "custom", "windows": windows}}).schedule == "3,G,5" + ",G" * 9
    assert "12-block" in refused({"attention": {"placement": "custom", "windows": [3]}})


def test_num_images_and_fraction_together_are_refused():
    message = refused({"data": {"num_images": 5, "fraction": 0.5}})
    assert "data.num_images (5)" in message and "data.fraction (0.5)" in message


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_fraction_outside_zero_one_is_refused(fraction):
    assert refused({"data": {"fraction": fraction}}).startswith("data.fraction:")


def test_fraction_of_one_is_the_whole_pool():
    assert build_config({"data": {"fraction": 1}}).data.fraction == 1.0


def test_unknown_model_size_names_the_field_and_choices():
    message = refused({"model": {"size": "DiT-Q/1"}})
    assert "model.size" in message and "DiT-Q/1" in message and "DiT-XS" in message


def test_image_size_must_divide_by_the_patch():
    assert "patch size 2" in refused({"model": {"size": "DiT-T/2"}, "data": {"image_size": 9}})


def test_beta_order_is_checked():
    assert "beta_end" in refused({"diffusion": {"beta_start": 0.02, "beta_end": 0.01}})


# ---------------------------------------------------------------------------------------------
# --set parsing


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("train.steps=50", ("train.steps", 50)),
        ("train.lr=0.5", ("train.lr", 0.5)),
        ("attention.windows=[3,5]", ("attention.windows", [3, 5])),
        ("attention.windows=[3, null]", ("attention.windows", [3, None])),
        ("data.num_images=null", ("data.num_images", None)),
        ("data.num_images=", ("data.num_images", None)),
        ("data.source=s3://bucket/key=1", ("data.source", "s3://bucket/key=1")),
        ("eval.fid.enabled=true", ("eval.fid.enabled", True)),
        ("model.size='7'", ("model.size", "7")),
        (" seed = 3", ("seed", 3)),
    ],
)
def test_parse_override_reads_yaml_scalars_and_lists(item, expected):
    assert parse_override(item) == expected


@pytest.mark.parametrize("item", ["train.steps", "=3", "train.steps:3"])
def test_parse_override_needs_key_equals_value(item):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override(item)


def test_parse_override_refuses_malformed_yaml():
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("attention.windows=[3,")


# ---------------------------------------------------------------------------------------------
# YAML files


def test_empty_yaml_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_yaml(path) == {}
    assert load_config(path) == TrialConfig()


def test_yaml_file_plus_overrides(tmp_path):
    path = tmp_path / "trial.yaml"
    path.write_text("train:\n  steps: 10\n  lr: 1e-3\nattention:\n  windows: [3, 5]\n")
    config = load_config(path, ["train.steps=4", "data.num_images=32"])
    assert (config.train.steps, config.train.lr, config.data.num_images) == (4, 0.001, 32)
    assert config.schedule.startswith("3,5,G")


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "42\n"])
def test_non_mapping_yaml_is_refused(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(path)


def test_malformed_yaml_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: {steps: [1,\n")
    with pytest.raises(ConfigError, match="broken.yaml' is not valid YAML"):
        load_yaml(path)
    deep = tmp_path / ("d" * 120) / "broken.yaml"  # a long path keeps its end: the file's name
    deep.parent.mkdir()
    deep.write_text("train: {steps: [1,\n")
    with pytest.raises(ConfigError, match=r"^'\.\.\.d+/broken\.yaml' is not valid YAML") as refused:
        load_yaml(deep)
    assert len(str(refused.value).split(" is not")[0]) <= 82


def test_missing_yaml_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "absent.yaml")


def test_config_is_frozen():
    config = TrialConfig()
    with pytest.raises(ValidationError, match="Instance is frozen"):
        config.train.steps = 3  # type: ignore[misc]
    assert config.train.steps == TrialConfig().train.steps
