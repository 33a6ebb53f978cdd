"""cluster.yaml: valid for Ray's autoscaler, and every node type fits what the workflows request."""

import os

import pytest
import yaml

from conftest import ROOT
from lits.core.config import ServeConfig, TrainConfig

# vCPUs and GPUs of the instance types cluster.yaml may use (AWS's published figures).
INSTANCES = {"m6i.2xlarge": (8, 0), "c6i.4xlarge": (16, 0), "g5.12xlarge": (48, 4), "p4d.24xlarge": (96, 8)}


@pytest.fixture(scope="module")
def cluster():
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def test_cluster_yaml_validates_against_rays_schema(cluster):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    import json

    with open(schema_path) as f:
        jsonschema.validate(cluster, json.load(f))
    # what `ray up` does before launching: fill in the provider's defaults, then its own checks
    validate_config(prepare_config(cluster))
    broken = dict(cluster, available_node_types={**cluster["available_node_types"], "gpu": {"resources": "four"}})
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(broken))


def test_node_types_declare_what_their_instances_have(cluster):
    types = cluster["available_node_types"]
    for name, node in types.items():
        vcpus, gpus = INSTANCES[node["node_config"]["InstanceType"]]
        declared = node["resources"]
        if name != cluster["head_node_type"]:  # the head offers no CPU to tasks on purpose
            assert declared["CPU"] <= vcpus, name
        assert declared.get("GPU", 0) == gpus, name
        assert "IamInstanceProfile" in node["node_config"], f"{name}: S3 goes through an instance profile"
    assert types["cpu-spot"]["min_workers"] == 0 and types["gpu"]["min_workers"] == 0
    assert types["cpu-spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "--dashboard-host=0.0.0.0" in " ".join(cluster["head_start_ray_commands"])


def test_workflow_requests_fit_the_node_types(cluster):
    gpu = cluster["available_node_types"]["gpu"]["resources"]
    cpu = cluster["available_node_types"]["cpu-spot"]["resources"]
    train = TrainConfig(data="-", output="-", num_gpus=4)
    # train --num-gpus 4 on one GPU node: 4 x (1 GPU + cpus_per_worker CPU), a CPU left for Ray Data
    assert train.workers <= gpu["GPU"] and train.workers * train.cpus_per_worker + 1 <= gpu["CPU"]
    serve = ServeConfig(model="-", num_gpus_per_replica=1)
    assert serve.num_gpus_per_replica <= gpu["GPU"] and serve.cpus_per_replica <= gpu["CPU"] / gpu["GPU"]
    # prepare, bulk-job volume tasks and evaluate take 1 CPU per volume
    assert serve.cpus_per_volume <= cpu["CPU"]


def _node_setup(cluster):
    """{node type: the commands that set it up, in the order Ray runs them}."""
    setup = {}
    for name, node in cluster["available_node_types"].items():
        own = cluster["head_setup_commands"] if name == cluster["head_node_type"] else \
            node.get("worker_setup_commands", cluster["worker_setup_commands"])
        setup[name] = list(cluster["setup_commands"]) + list(own)
    return setup


def test_every_node_runs_the_submitters_version_with_the_torch_of_its_hardware(cluster):
    """Issue 24, item 5: the same versions everywhere (torch as the Makefile's TORCH_SPEC, the rest
    as constraints.txt, ray as the tests'), the CPU wheel on CPU nodes and the CUDA one on GPU nodes,
    torch installed before the project (so pip keeps it), python3-venv and the region on every node."""
    import re

    import ray

    with open(os.path.join(ROOT, "Makefile")) as f:
        torch_spec = re.search(r"^TORCH_SPEC \?= (\S+)$", f.read(), re.M).group(1)
    assert cluster["file_mounts"]["/home/ubuntu/lits"] == "."  # the checkout, as it is
    for name, commands in _node_setup(cluster).items():
        text = "\n".join(commands)
        gpus = cluster["available_node_types"][name]["resources"].get("GPU", 0)
        torch_line = next(i for i, c in enumerate(commands) if f"pip install --quiet {torch_spec}" in c)
        project_line = next(i for i, c in enumerate(commands) if "-c ~/lits/constraints.txt -e ~/lits" in c)
        assert torch_line < project_line, name
        assert ("download.pytorch.org/whl/cpu" in commands[torch_line]) == (gpus == 0), name
        assert f"ray[data,train,serve,default]=={ray.__version__}" in commands[project_line], name
        assert "python3-venv" in text and f"AWS_DEFAULT_REGION={cluster['provider']['region']}" in text, name
    assert "boto3" in "\n".join(cluster["head_setup_commands"])  # the autoscaler's AWS client, on the head


def test_a_gpu_node_whose_torch_sees_no_gpu_fails_its_setup(cluster):
    """The GPU node type's last setup command fails, naming the problem, when torch sees fewer GPUs
    than the node declares: run here (no GPU), it does."""
    import subprocess
    import sys

    node = cluster["available_node_types"]["gpu"]
    check = node["worker_setup_commands"][-1].replace("~/venv/bin/python", sys.executable)
    assert f"device_count() == {node['resources']['GPU']}" in check
    result = subprocess.run(check, shell=True, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "sees 0 of 4 GPUs" in result.stderr, result.stderr


def test_each_node_type_has_a_resource_of_its_own(cluster):
    """Requests shaped like the node that should come (the autoscaler test above) need one."""
    own = {name: [r for r in node["resources"] if r.startswith("lits_")]
           for name, node in cluster["available_node_types"].items()}
    assert own == {"head": ["lits_head"], "cpu-spot": ["lits_cpu"], "gpu": ["lits_gpu"]}


def test_a_bulk_job_may_use_every_cpu_node(cluster):
    """Issue 14.5: a job's cap (256) was below 20 cpu-spot nodes x 16 CPUs."""
    from lits.serve.job_capacity import MAX_CONCURRENCY

    cpu = cluster["available_node_types"]["cpu-spot"]
    assert MAX_CONCURRENCY * ServeConfig(model="-").cpus_per_volume >= cpu["max_workers"] * cpu["resources"]["CPU"]
    assert cluster["available_node_types"][cluster["head_node_type"]]["resources"]["CPU"] == 0  # what the test of
    # test_multinode.py::test_a_bulk_job_takes_the_cpu_node_that_joins builds


def _nodes_to_launch(cluster, request):
    """What Ray's own autoscaler (its resource-demand scheduler over cluster.yaml's node types, a
    cluster holding only its head) launches for a `request_resources` request of these bundles."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import ResourceDemandScheduler
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(cluster)
    scheduler = ResourceDemandScheduler(None, config["available_node_types"], config["max_workers"],
                                        config["head_node_type"], config.get("upscaling_speed", 1.0))
    launch, _ = scheduler.get_nodes_to_launch(
        nodes=[], launching_nodes={}, resource_demands=[], unused_resources_by_ip={}, pending_placement_groups=[],
        max_resources_by_ip={}, ensure_min_cluster_size=request, node_availability_summary=NodeAvailabilitySummary({}))
    # the scheduler, given no nodes, counts the head in: it is up already in any running cluster
    return {name: count for name, count in launch.items() if count and name != config["head_node_type"]}


def test_cpu_work_asks_for_cpu_nodes_only(cluster):
    """A 1,000-volume job (or prepare) asks the autoscaler for its CPUs as bundles only cpu-spot holds:
    Ray's scheduler then starts every cpu-spot node it may, and not one GPU node (plain CPU bundles
    would spill onto g5 nodes once cpu-spot is at max_workers)."""
    from lits.runtime import fanout

    cpu_spot = cluster["available_node_types"]["cpu-spot"]
    launch = _nodes_to_launch(cluster, fanout.cpu_bundles(1004))
    assert launch == {"cpu-spot": cpu_spot["max_workers"]}, launch
    assert "gpu" in _nodes_to_launch(cluster, [{"CPU": 1}] * 1004)  # what a plain CPU request does
    for name, node in cluster["available_node_types"].items():  # one unit of the resource per CPU, on CPU nodes only
        assert node["resources"].get(fanout.CPU_NODE_RESOURCE, 0) == (node["resources"]["CPU"] if name == "cpu-spot" else 0)
