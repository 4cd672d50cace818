"""Specs, configs and `--set` values a researcher really types, or a broken file: refused fast, exit 2,
a message of a few bounded lines, and nothing written in the working directory. Also what `launch`
refuses before anything starts: grid values, data it cannot read, a tracking store it cannot open,
and strings MLflow would refuse or cut."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

# Imported here, so the timed commands measure the checks, not the first import of torch and MLflow.
import orchestrator.cluster  # noqa: F401
import orchestrator.launch  # noqa: F401
import orchestrator.plan  # noqa: F401
import orchestrator.progress  # noqa: F401
import orchestrator.report  # noqa: F401
import orchestrator.tracking  # noqa: F401
import trainer.inception  # noqa: F401
import trainer.train  # noqa: F401
from orchestrator.cli import app
from tests.support.sweeps import free_port, invoke, tiny_config, write_spec
from trainer.bounded_yaml import MAX_YAML_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES

MAX_MESSAGE_LINES = 8
MAX_MESSAGE_CHARS = 1200


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# A bound against a hang or a blow-up (an alias bomb expands to 9^9 nodes; an unbounded read of a huge
# file), not a speed target: a refusal takes 0.2-0.6 s here, measured by benchmarks/bad_input_latency.py
# (benchmarks/RESULTS.md section 9), and a loaded 2-core machine has taken 1.6 s.
REFUSAL_BOUND_S = 10.0


def refused(args: list[str], workdir: Path, seconds: float = REFUSAL_BOUND_S) -> str:
    """Run the CLI; assert exit 2 within `seconds`, a short message, and no new file or folder."""
    before = sorted(p.name for p in workdir.iterdir())
    start = time.perf_counter()
    result = CliRunner().invoke(app, args)
    elapsed = time.perf_counter() - start
    assert result.exit_code == 2, result.output
    assert elapsed < seconds, f"took {elapsed:.2f} s"
    message = result.output.strip()
    assert message.startswith("error: "), message
    assert len(message.splitlines()) <= MAX_MESSAGE_LINES, message
    assert len(message) <= MAX_MESSAGE_CHARS, message[:2000]
    assert sorted(p.name for p in workdir.iterdir()) == before
    return message


def write(workdir: Path, content: bytes | str, name: str = "spec.yaml") -> Path:
    path = workdir / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def spec_text(**fields) -> str:
    spec = {"name": "t", "base": tiny_config(), "grid": {"attention.placement": ["none", "head"]}, **fields}
    return yaml.safe_dump(spec)


BILLION_LAUGHS = "\n".join(
    ["name: t", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"name: t\ndescription: caf\xe9 au lait\n", "not UTF-8 text (byte 0xe9 at offset 24)"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 text"),
        ("name: [unclosed\n", "not valid YAML"),
        ("name: t\n\tgrid: {}\n", "not valid YAML"),
        ("name: t\x00\n", "not valid YAML"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("name: t\nbase: " + "[" * 500 + "]" * 500 + "\n", f"nests deeper than {MAX_YAML_DEPTH} levels"),
        ("name: t\nbase: " + "[" * 30000 + "]" * 30000 + "\n", "nest"),  # libyaml: "maximum nesting depth"
        ("name: t\n" + "\n".join(" " * i + "base:" for i in range(100)) + " 1\n", "nests deeper"),
        ("name: t\nbase: " + "{a: " * 200 + "1" + "}" * 200 + "\n", "nests deeper"),
        (BILLION_LAUGHS, f"expands to more than {MAX_YAML_NODES} values"),
        ("name: t\nbase: &loop [*loop]\n", "refers to itself"),
    ],
    ids=["latin-1", "png", "unclosed", "tab", "nul", "list", "deep-lists", "deeper-lists", "deep-block", "deep-maps", "alias-bomb", "cycle"],
)
@pytest.mark.parametrize("command", ["plan", "launch", "train"])
def test_broken_files_are_refused_fast_and_briefly(workdir, command, content, expected):
    path = write(workdir, content)
    message = refused([command, str(path)], workdir)
    assert expected in message


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(workdir):
    path = write(workdir, spec_text() + "#" * MAX_YAML_BYTES + "\n")
    message = refused(["plan", str(path)], workdir)
    assert f"limited to {MAX_YAML_BYTES} bytes" in message
    assert str(path.stat().st_size) in message


def test_a_utf8_byte_order_mark_is_fine(workdir):
    path = write(workdir, b"\xef\xbb\xbf" + spec_text().encode())
    result = CliRunner().invoke(app, ["plan", str(path)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"base": {"train": {"steps": "9" * 50_000}}}, "train.steps"),
        ({"base": {"model": {"size": "DiT-" + "X" * 50_000}}}, "model.size"),
        ({"name": "t" * 100, "grid": {"train.steps": ["x" * 50_000]}}, "grid.train.steps"),
        ({"base": {"train": {"k" * 50_000: 1}}}, "unknown config key"),
        ({"grid": {"s" * 50_000: [1]}}, "unknown config key"),
        ({"grid": {"seed": [[0] * 2_000, [0] * 2_000]}}, "repeats a value"),
        ({"grid": {"attention.windows": [["x"] * 500]}}, "more problems"),
    ],
    ids=["long-number", "long-size", "long-axis-value", "long-key", "long-axis", "repeated-long", "many-problems"],
)
def test_huge_values_are_shortened_in_messages(workdir, fields, field):
    path = write(workdir, spec_text(**fields))
    message = refused(["plan", str(path)], workdir)
    assert field in message
    assert "characters)" in message or "more problems" in message or "..." in message


def test_a_huge_set_value_is_shortened(workdir):
    path = write(workdir, spec_text())
    message = refused(["plan", str(path), "--set", "train.steps=" + "7" * 200_000 + "x"], workdir)
    assert message.startswith("error: --set train.steps=777")


def test_a_train_config_with_a_huge_value_gets_a_short_message(workdir):
    path = write(workdir, yaml.safe_dump({"train": {"lr": "fast" * 12_000}}), "config.yaml")
    message = refused(["train", str(path)], workdir)
    assert "train.lr" in message


# ---------------------------------------------------------------------------------------------
# --set versus the grid: the message blames what is wrong


def test_an_invalid_set_is_blamed_not_the_first_axis(workdir):
    path = write(workdir, spec_text(grid={"seed": [0, 1]}))
    message = refused(["plan", str(path), "--set", "train.steps=-5"], workdir)
    assert message.startswith("error: --set train.steps=-5: train.steps: Input should be greater than or equal to 1")
    assert "grid" not in message


def test_a_set_invalid_only_with_some_grid_values_is_blamed(workdir):
    # image_size 6 is fine for patch 1 and not for patch 4: the --set is what breaks the DiT-T/4 point.
    path = write(workdir, spec_text(grid={"model.size": ["DiT-T/1", "DiT-T/4"]}))
    message = refused(["plan", str(path), "--set", "train.lr=0.01", "--set", "data.image_size=6"], workdir)
    assert message.startswith("error: --set data.image_size=6: data.image_size=6 is not divisible by the patch size 4")


@pytest.mark.parametrize("command", ["plan", "launch"])
def test_an_unknown_set_key_is_blamed_on_the_set(workdir, command):
    path = write(workdir, spec_text())
    message = refused([command, str(path), "--set", "train.stepz=5"], workdir)
    assert message.startswith("error: --set train.stepz=5: unknown config key 'train.stepz'")


def test_an_invalid_grid_value_still_names_its_axis(workdir):
    path = write(workdir, spec_text(grid={"train.steps": [2, -1]}))
    message = refused(["plan", str(path), "--set", "train.lr=0.01"], workdir)
    assert message.startswith("error: grid.train.steps: value -1 is not valid")
    assert "--set" not in message


def test_an_invalid_base_is_blamed_on_the_base(workdir):
    path = write(workdir, spec_text(base=tiny_config({"train.steps": -3}), grid={"seed": [0, 1]}))
    message = refused(["plan", str(path)], workdir)
    assert message.startswith("error: base: train.steps: Input should be greater than or equal to 1")


def plan_keys(output: str) -> list[str]:
    """The trial keys of a `plan` table (the column after the memory estimate)."""
    return [line.split()[-2] for line in output.splitlines() if line[:1].isdigit() and line.split()[-1] == "run"]


def test_a_valid_set_still_applies(workdir):
    """The --set reaches every trial: the plan's trials are those of a spec whose base says the same."""
    path = write(workdir, spec_text(grid={"seed": [0, 1]}))
    result = CliRunner().invoke(app, ["plan", str(path), "--set", "train.steps=3"])
    assert result.exit_code == 0, result.output
    same = write(workdir, spec_text(base=tiny_config({"train.steps": 3}), grid={"seed": [0, 1]}), "same.yaml")
    without = CliRunner().invoke(app, ["plan", str(path)])
    expected = CliRunner().invoke(app, ["plan", str(same)])
    assert len(plan_keys(result.output)) == 2
    assert plan_keys(result.output) == plan_keys(expected.output)
    assert not set(plan_keys(result.output)) & set(plan_keys(without.output))


def test_any_bad_input_message_is_bounded_at_the_cli(workdir):
    # The data code quotes a source as given; the CLI's last guard keeps the line short.
    message = refused(["prepare-data", "x" * 100_000, "out"], workdir)
    assert message.startswith("error: data source 'xxx") and len(message) <= len("error: ") + 1000
    assert message.endswith("...")


# ---------------------------------------------------------------------------------------------
# `launch` refuses bad grid values, data it cannot read, a store it cannot open, strings MLflow would
# refuse or cut: exit 2, one message naming the problem, nothing started or written (the CLI in this
# process: it stops before Ray or MLflow start).


BAD_GRIDS = {
    "even window": ({"attention.windows": [[3, 4]]}, "4"),
    "zero window": ({"attention.windows": [[0]]}, "0"),
    "schedule longer than depth": ({"attention.windows": [[3] * 13]}, "13 windows"),
    "fraction above 1": ({"data.fraction": [1.5]}, "1.5"),
    "fraction zero": ({"data.fraction": [0]}, "data.fraction"),
    "empty axis": ({"seed": []}, "grid.seed"),
    "unknown axis": ({"train.stepz": [1]}, "stepz"),
    "wrong type": ({"train.batch_size": ["big"]}, "big"),
    "bad placement": ({"attention.placement": ["head", "sideways"]}, "sideways"),
}


@pytest.mark.parametrize("case", sorted(BAD_GRIDS))
def test_bad_grid_values_exit_2_and_write_nothing(tmp_path, monkeypatch, case):
    grid, expected = BAD_GRIDS[case]
    spec = write_spec(tmp_path, grid=grid)
    result, written = invoke(tmp_path, monkeypatch, "launch", str(spec))
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert written == set()


def test_unknown_top_level_key_exits_2(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, retries=3)
    result, written = invoke(tmp_path, monkeypatch, "launch", str(spec))
    assert result.exit_code == 2 and "retries" in result.output
    assert written == set()


def test_num_images_beyond_the_pool_exits_2(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, grid={"data.num_images": [16, 5000]})
    result, written = invoke(tmp_path, monkeypatch, "launch", str(spec))
    assert result.exit_code == 2
    assert "data.num_images=5000" in result.output and "1781" in result.output
    assert written == set()


def test_missing_data_uri_exits_2(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, grid={"data.source": [str(tmp_path / "no-such-data.npy")]})
    result, written = invoke(tmp_path, monkeypatch, "launch", str(spec))
    assert result.exit_code == 2 and "no-such-data.npy" in result.output
    assert written == set()


def test_unreachable_s3_data_exits_2(tmp_path, monkeypatch, s3_env):
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(name, dead)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    spec = write_spec(tmp_path, grid={"data.source": ["s3://ditsweep-data/digits.npy"]})
    result, written = invoke(tmp_path, monkeypatch, "launch", str(spec))
    assert result.exit_code == 2 and "s3://ditsweep-data/digits.npy" in result.output
    assert written == set()


@pytest.mark.parametrize("uri", ["sqlite:///{tmp}/missing-folder/mlflow.db", "http://127.0.0.1:{port}"])
def test_tracking_uri_that_cannot_be_opened_exits_2(tmp_path, monkeypatch, uri):
    spec = write_spec(tmp_path)
    uri = uri.format(tmp=tmp_path, port=free_port())
    result, written = invoke(tmp_path, monkeypatch, "launch", str(spec), "--tracking-uri", uri)
    assert result.exit_code == 2, result.output
    expected = "cannot reach tracking server" if uri.startswith("http") else "does not exist"
    assert expected in result.stderr and uri in result.stderr
    assert written == set()


# Strings that reach MLflow, Ray or a file name: refused at validation where MLflow would refuse or cut them.


@pytest.mark.parametrize(
    ("spec_fields", "args", "expected"),
    [
        ({"name": "n" * 5000}, [], "name: String should have at most 256 characters"),
        ({"description": "d" * 9000}, [], "description: String should have at most 8000 characters"),
        ({}, ["--set", "train.steps=4"] * 600, "MLflow keeps at most 8000"),
        ({}, ["--storage", "s" * 9000], "--storage is 9000 characters; MLflow keeps at most 8000"),
    ],
    ids=["long-name", "long-description", "many-sets", "long-storage"],
)
def test_strings_mlflow_would_refuse_or_cut_exit_2_and_write_nothing(tmp_path, monkeypatch, spec_fields, args,
                                                                      expected):
    spec = write_spec(tmp_path)
    spec.write_text(yaml.safe_dump({**yaml.safe_load(spec.read_text()), **spec_fields}))
    result, written = invoke(tmp_path, monkeypatch, "launch", str(spec), *args)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr, result.stderr
    assert written == set()


def test_a_trial_name_fits_mlflow_and_its_folder_name_fits_the_file_system():
    from orchestrator.spec import run_name
    from orchestrator.sweep import _dirname

    class Trial:
        config = {"trial": {"name": run_name({"data.source": "/data/" + "é" * 400}), "key": "0123456789abcdef"}}

    assert len(Trial.config["trial"]["name"]) == 250  # MLflow's runs.name column
    folder = _dirname(Trial)
    assert len(folder.encode()) <= 255 and folder.isascii() and folder.endswith("-0123456789")


# ---------------------------------------------------------------------------------------------
# Bad input answered without torch, Ray or MLflow (each some seconds to import): measured per command
# in benchmarks/bad_input_latency.py


@pytest.mark.parametrize(
    "args",
    [["launch", "bad.yaml"], ["launch", "missing.yaml"], ["plan", "bad.yaml"], ["train", "config.yaml"],
     ["resume", "x'or'1"], ["resume", "some-sweep-1"], ["status", "some-sweep-1"], ["report", "x'or'1"],
     ["report", "some-sweep-1"]],
    ids=lambda args: "-".join(args).replace("'", ""),
)
def test_bad_input_is_answered_without_importing_torch_ray_or_mlflow(tmp_path, args):
    import os
    import subprocess
    import sys

    (tmp_path / "bad.yaml").write_text("name: bad\ngrid: {attention.placement: [sideways]}\n")
    (tmp_path / "config.yaml").write_text("train: {steps: -1}\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "orchestrator.cli", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr[-2000:]
    lines = done.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    assert "typer" in imported  # -X importtime did report
    assert not imported & {"torch", "ray", "mlflow"}, imported & {"torch", "ray", "mlflow"}
    assert [line for line in lines if line.startswith("error: ")], done.stderr[-2000:]
