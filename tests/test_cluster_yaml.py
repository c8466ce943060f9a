"""cluster.yaml: valid for Ray's own cluster launcher, and able to run what our jobs request.

Offline: Ray's `prepare_config` (merges the AWS provider defaults shipped in the package) and
`validate_config` (the bundled `ray-schema.json` plus Ray's cross-field checks). No AWS call,
no boto3, no network. Mutations prove the validation can fail.
"""

from __future__ import annotations

import argparse
import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from jobs import refine as refine_job
from jobs.options_doc import discover_jobs
from pipelines.cli import Resources

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


def _load() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validated(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before it talks to AWS: fill defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def prepared() -> dict[str, Any]:
    return _validated(_load())


def _node_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return config["available_node_types"]


def _gpu_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in _node_types(config).items() if v["resources"].get("GPU", 0) > 0}


def _cpu_only_worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        k: v
        for k, v in _node_types(config).items()
        if k != config["head_node_type"] and v["resources"].get("GPU", 0) == 0
    }


def _pins() -> dict[str, str]:
    """`name -> requirement` for the pinned (==) dependencies of pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in project["dependencies"]:
        match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)$", requirement.strip())
        if match:
            pins[match.group(1).lower()] = requirement.strip()
    return pins


def test_ray_accepts_the_config(prepared: dict[str, Any]) -> None:
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # prepare_config merges the common setup commands into head and worker setup.
    assert any("pip install" in c for c in prepared["worker_setup_commands"])
    assert prepared["idle_timeout_minutes"] > 0


@pytest.mark.parametrize(
    ("mutation", "error"),
    [
        (lambda c: c["available_node_types"]["gpu_worker"].pop("resources"), "resources"),
        (lambda c: c.update(unknown_top_level_key=1), "unknown_top_level_key"),
        (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5), "0.5"),
        (lambda c: c.update(head_node_type="no_such_type"), "head_node_type"),
        (lambda c: c["available_node_types"]["cpu_worker"].update(min_workers=99), "min_workers"),
        (lambda c: c["docker"].update(imagee="typo"), "imagee"),
    ],
    ids=["no-resources", "unknown-key", "fractional-gpu", "bad-head", "min-over-max", "typo"],
)
def test_ray_rejects_broken_mutations(mutation: Any, error: str) -> None:
    config = _load()
    mutation(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)) as raised:
        _validated(config)
    assert error in str(raised.value)


def _gpu_job_defaults() -> dict[str, argparse.Namespace]:
    """Defaults of every job that can run on GPUs (it has `--device`)."""
    found = {}
    for job in discover_jobs():
        if any("--device" in a.option_strings for a in job.parser._actions):
            defaults = {a.dest: a.default for a in job.parser._actions}
            found[job.name] = argparse.Namespace(**defaults)
    return found


def test_gpu_type_holds_each_gpu_job(prepared: dict[str, Any]) -> None:
    """With `--device gpu` a Ray Train worker asks 1 GPU + `--cpus-per-worker` CPUs, a model
    replica (pseudo masks) 1 GPU + `--cpus-per-actor`; `--num-workers` of them at once."""
    gpu_types = _gpu_types(prepared)
    assert gpu_types, "no node type declares a GPU"
    jobs = _gpu_job_defaults()
    assert "train" in jobs
    for name, node in gpu_types.items():
        assert node["resources"]["GPU"] >= 1, name
        assert node["node_config"]["InstanceType"].split(".")[0][0] in "gp", name
    capacity = sum(n["max_workers"] * n["resources"]["GPU"] for n in gpu_types.values())
    for job, defaults in jobs.items():
        cpus = [getattr(defaults, k, None) for k in ("cpus_per_worker", "cpus_per_actor")]
        cpus_needed = max([c for c in cpus if c is not None], default=1.0)
        for name, node in gpu_types.items():
            # + 1 CPU for the per-worker CRF process pool and data loading
            assert node["resources"]["CPU"] >= cpus_needed + 1, (job, name)
        assert capacity >= (getattr(defaults, "num_workers", None) or 1), job


def test_cpu_type_holds_the_crf_stages(prepared: dict[str, Any]) -> None:
    """refine asks 1 CPU per CRF task, ingest `Resources().num_cpus_per_task`; no GPU."""
    cpu_types = _cpu_only_worker_types(prepared)
    assert cpu_types, "no CPU worker type"
    wanted = max(refine_job.DEFAULT_RESOURCES.num_cpus_per_task, Resources().num_cpus_per_task)
    for name, node in cpu_types.items():
        assert node["resources"]["CPU"] >= wanted, name
        assert node["max_workers"] >= 1, name


def test_worker_limits_fit_the_global_limit(prepared: dict[str, Any]) -> None:
    workers = [n for k, n in _node_types(prepared).items() if k != prepared["head_node_type"]]
    assert all(n["min_workers"] == 0 for n in workers)  # nothing bills between jobs
    assert sum(n["max_workers"] for n in workers) <= prepared["max_workers"]
    head = _node_types(prepared)[prepared["head_node_type"]]
    assert head["max_workers"] == 0


def test_every_node_has_an_image_and_workers_an_instance_role(prepared: dict[str, Any]) -> None:
    # Without ImageId Ray falls back to an Ubuntu 18.04 AMI whose driver is too old for CUDA 13.
    for name, node in _node_types(prepared).items():
        assert node["node_config"].get("ImageId"), name
        if name != prepared["head_node_type"]:  # Ray gives the head its profile itself
            assert node["node_config"].get("IamInstanceProfile"), name


def test_setup_installs_the_pinned_versions(prepared: dict[str, Any]) -> None:
    setup = "\n".join(prepared["setup_commands"])
    pins = _pins()
    for name in ("torch", "torchvision"):
        assert pins[name] in setup, f"{pins[name]} (pyproject.toml) not in setup_commands"
    assert "download.pytorch.org/whl/" in setup
    ray_pin = pins["ray"]
    assert ray_pin in setup
    ray_version = ray_pin.split("==")[1]
    python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minor = re.search(r">=3\.(\d+)", python)
    assert minor is not None
    images = [prepared["docker"]["image"]] + [
        n["docker"]["worker_image"] for n in _node_types(prepared).values() if "docker" in n
    ]
    for image in images:
        assert f":{ray_version}-py3{minor.group(1)}-" in image, image
    assert re.search(r"pip install -q /home/ray/weakclip$", setup, re.MULTILINE)
    assert prepared["file_mounts"]["/home/ray/weakclip"] == "."


def test_token_authentication_on_every_node(prepared: dict[str, Any]) -> None:
    assert prepared["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in prepared[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token ray start" in c for c in start), key
    assert any("export RAY_AUTH_MODE=token" in c for c in prepared["setup_commands"])
