"""orchestrator.launch's functions called directly (launch and resume through the CLI are
test_sweep's, test_preflight's and test_fault_injection's): the order of launch's checks, which
refuse bad input before a tracking store is created or Ray is started, its resources check against
this machine, and resume's refusal of a store that is not there."""

from __future__ import annotations

import os
import re

import pytest

from orchestrator.adaptive import StoppingRule
from orchestrator.launch import check_resources, launch, resume
from orchestrator.resources import ResourcesError
from orchestrator.spec import SpecError, load_spec
from orchestrator.tracking import TrackingError
from tests.support.sweeps import sqlite_uri, tree, write_spec


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """An empty working folder with no tracking URI or Ray address from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def refused_before_anything(folder, error: type[Exception], match: str, *args, **kwargs) -> None:
    """launch(*args, **kwargs) raises `error` and leaves the folder as it was: no store, no results."""
    before = tree(folder)
    with pytest.raises(error, match=match):
        launch(*args, tracking_uri=sqlite_uri(folder), **kwargs)
    assert tree(folder) == before


def test_a_trial_this_machine_can_never_hold_is_refused_before_the_store_is_made(folder):
    cpus = os.cpu_count() + 1
    spec = write_spec(folder, resources={"cpu": cpus})
    refused_before_anything(folder, ResourcesError, rf"resources.cpu={cpus} but this machine has", spec, [])


def test_a_storage_mlflow_cannot_keep_is_refused_before_the_store_is_made(folder):
    spec = write_spec(folder)
    refused_before_anything(folder, SpecError, "--storage is 9000 characters", spec, [], storage="s" * 9000)


def test_until_confident_without_a_shuffle_axis_is_refused_before_the_store_is_made(folder):
    spec = write_spec(folder, grid={"attention.placement": ["none", "head"], "seed": [0, 1]})
    rule = StoppingRule(target_halfwidth=0.5, max_shuffles=4, max_added_trials=None)
    refused_before_anything(folder, SpecError, "the spec's grid has no data.shuffle_seed axis", spec, [],
                            until_confident=rule)


def test_a_trial_that_fits_this_machine_runs_now(folder):
    spec = load_spec(write_spec(folder, resources={"cpu": 1}))
    fit = check_resources(spec, address=None)
    assert fit.when == "now" and fit.message == ""
    spec_file = write_spec(folder, name="all", resources={"cpu": os.cpu_count()})
    assert check_resources(load_spec(spec_file), address=None).when == "now"  # every CPU, not one more


def test_resume_without_a_store_names_it_and_creates_none(folder):
    uri = sqlite_uri(folder)
    with pytest.raises(TrackingError, match=re.escape(f"no tracking store at {uri!r}")):
        resume("tiny-20260101-000000-abcd", tracking_uri=uri)
    assert tree(folder) == set()
