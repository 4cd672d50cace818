"""Whether a cluster can ever run a trial: now, after the autoscaler adds a node, or never (bad input)."""

from __future__ import annotations

import pytest

from orchestrator.resources import Cluster, Fit, NodeType, ResourcesError, check_trial_fits, trial_request
from orchestrator.spec import Resources, SpecError

LAPTOP = Cluster(nodes=[{"CPU": 2.0, "memory": 8e9}], local=True)
GPU_BOX = Cluster(nodes=[{"CPU": 16.0, "GPU": 1.0}], local=True)
CPU_HEAD = {"CPU": 4.0}
KUBERAY = Cluster(
    nodes=[CPU_HEAD],
    node_types={
        "head": NodeType({"CPU": 4.0}, max_workers=0),
        "cpu-workers": NodeType({"CPU": 8.0}, max_workers=4),
        "gpu-workers": NodeType({"CPU": 8.0, "GPU": 2.0}, max_workers=2),
    },
)


def test_request_uses_ray_names_and_drops_zeros():
    assert trial_request(Resources(cpu=2, gpu=0)) == {"CPU": 2.0}
    assert trial_request(Resources(cpu=1, gpu=0.5)) == {"CPU": 1.0, "GPU": 0.5}


def test_a_trial_that_fits_this_machine_runs_now():
    assert check_trial_fits({"CPU": 2.0}, LAPTOP) == Fit("now")
    assert check_trial_fits({"CPU": 1.0, "GPU": 0.25}, GPU_BOX) == Fit("now")


def test_a_gpu_on_a_machine_without_one_names_the_fix():
    with pytest.raises(ResourcesError) as err:
        check_trial_fits(trial_request(Resources(gpu=1)), LAPTOP)
    assert str(err.value) == (
        "resources.gpu=1 but this machine has no GPU: pass --address of a cluster with GPUs, "
        "or set resources.gpu: 0 in the spec"
    )
    assert isinstance(err.value, SpecError)  # the CLI's exit 2


def test_more_cpus_than_this_machine_has_names_amounts_and_fix():
    with pytest.raises(ResourcesError) as err:
        check_trial_fits({"CPU": 64.0}, LAPTOP)
    assert str(err.value) == (
        "resources.cpu=64 but this machine has 2 CPUs: pass --address of a cluster with larger nodes, "
        "or set resources.cpu: 2 or less in the spec"
    )


def test_two_gpus_on_a_one_gpu_machine():
    with pytest.raises(ResourcesError, match=r"resources.gpu=2 but this machine has 1 GPU: .*resources.gpu: 1 or less"):
        check_trial_fits({"CPU": 1.0, "GPU": 2.0}, GPU_BOX)


def test_in_process_ray_never_waits_for_a_scale_up():
    local_with_types = Cluster(nodes=LAPTOP.nodes, node_types={"gpu": NodeType({"GPU": 1.0}, 3)}, local=True)
    with pytest.raises(ResourcesError, match="this machine has no GPU"):
        check_trial_fits({"GPU": 1.0}, local_with_types)


def test_a_gpu_only_an_autoscaler_group_has_is_accepted_and_says_what_it_waits_for():
    fit = check_trial_fits({"CPU": 1.0, "GPU": 1.0}, KUBERAY)
    assert fit.when == "after scale-up"
    assert fit.message == "waiting for 1 GPU: the cluster is scaling up (node type gpu-workers)"


def test_more_cpus_than_current_nodes_waits_for_a_larger_node_type():
    fit = check_trial_fits({"CPU": 6.0}, KUBERAY)
    assert fit.when == "after scale-up"
    assert fit.message == "waiting for 6 CPUs: the cluster is scaling up (node type cpu-workers)"


def test_current_nodes_win_over_node_types():
    assert check_trial_fits({"CPU": 4.0}, KUBERAY) == Fit("now")


def test_node_types_with_no_replicas_left_do_not_count():
    frozen = Cluster(nodes=[CPU_HEAD], node_types={"gpu-workers": NodeType({"CPU": 8.0, "GPU": 2.0}, max_workers=0)})
    with pytest.raises(ResourcesError) as err:
        check_trial_fits({"CPU": 1.0, "GPU": 1.0}, frozen)
    assert str(err.value).startswith(
        "resources.gpu=1 but no node of the cluster, current or one its autoscaler can add, has a GPU: "
        "set resources.gpu: 0 in the spec"
    )


def test_more_than_any_node_type_names_the_largest():
    with pytest.raises(ResourcesError) as err:
        check_trial_fits({"CPU": 1.0, "GPU": 4.0}, KUBERAY)
    assert "resources.gpu=4" in str(err.value)
    assert "has more than 2 GPUs" in str(err.value)
    assert "resources.gpu: 2 or less" in str(err.value)


def test_resources_that_exist_only_on_different_nodes_are_refused():
    split = Cluster(nodes=[{"CPU": 16.0}, {"CPU": 2.0, "GPU": 1.0}])
    with pytest.raises(ResourcesError) as err:
        check_trial_fits({"CPU": 8.0, "GPU": 1.0}, split)
    message = str(err.value)
    assert "resources.cpu=8, resources.gpu=1 must all be on one node" in message
    assert "16 CPU, 0 GPU; 2 CPU, 1 GPU" in message


def test_fractional_gpus_add_up_without_rounding_errors():
    assert check_trial_fits({"GPU": 0.1 + 0.2}, Cluster(nodes=[{"GPU": 0.3}])) == Fit("now")


def test_a_cluster_with_no_nodes_yet_waits_for_its_node_types():
    empty = Cluster(nodes=[], node_types={"cpu-workers": NodeType({"CPU": 8.0}, max_workers=1)})
    assert check_trial_fits({"CPU": 2.0}, empty).when == "after scale-up"
    with pytest.raises(ResourcesError, match="no node of the cluster"):
        check_trial_fits({"CPU": 2.0}, Cluster(nodes=[]))
