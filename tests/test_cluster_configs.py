"""Deployment files in cluster/: they parse, and agree with each other, the Makefile and the `distill` CLI.

Nothing here starts Ray or talks to Kubernetes or AWS: the files are read as data.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
YAMLS = sorted(CLUSTER.glob("*.yaml"))
DOCKERFILE = CLUSTER / "Dockerfile"
MAKEFILE = ROOT / "Makefile"
COMMAND_KEYS = {"entrypoint", "command", "args"}  # where a pod, job or RayJob names what it runs


# -- helpers -----------------------------------------------------------------------------------------------------


def _documents(path: Path) -> list:
    with path.open() as f:
        return list(yaml.safe_load_all(f))


def _doc(name: str, kind: str | None = None) -> dict:
    """The one document of `kind` (or the only document) in cluster/<name>."""
    docs = [d for d in _documents(CLUSTER / name) if kind is None or d.get("kind") == kind]
    assert len(docs) == 1, f"{name}: expected one {kind or 'document'}, found {len(docs)}"
    return docs[0]


def _walk(node, key: str | None = None):
    """Yields (key, value) for every mapping entry, at any depth."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v, k)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def _values(key: str) -> list[tuple[str, object]]:
    """(file name, value) of every `key` in every cluster/*.yaml document."""
    return [(p.name, v) for p in YAMLS for d in _documents(p) for k, v in _walk(d) if k == key]


def _distill_argvs() -> list[tuple[str, list[str]]]:
    """(file name, argv after `distill`) for every `distill ...` command line in an entrypoint/command/args."""
    found = []
    for path in YAMLS:
        for doc in _documents(path):
            for key, value in _walk(doc):
                if key not in COMMAND_KEYS:
                    continue
                argv = shlex.split(value) if isinstance(value, str) else [str(v) for v in value]
                if "distill" in argv:
                    found.append((path.name, argv[argv.index("distill") + 1:]))
    return found


def _cli_parser() -> argparse.ArgumentParser:
    from pipeline.cli import _parser

    return _parser()


def _cli_subcommands() -> set[str]:
    actions = [a for a in _cli_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {name for action in actions for name in action.choices}


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    """(file name, RayCluster spec) from the RayCluster, the RayJob and the RayCronJob."""
    return [
        ("raycluster.yaml", _doc("raycluster.yaml", "RayCluster")["spec"]),
        ("rayjob.yaml", _doc("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]),
        ("raycronjob.yaml", _doc("raycronjob.yaml", "RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"]),
    ]


def _pins(text: str) -> dict[str, str]:
    """{package: version} of every `name==version` or `name[extras]==version` in `text`."""
    return {name.lower(): version for name, version in re.findall(r"([A-Za-z][\w.-]*)(?:\[[^\]]*\])?==([\w.]+)", text)}


def _makefile_pins() -> dict[str, str]:
    match = re.search(r"^PINS\s*:=\s*(.*?)(?:\n(?!\s)|\Z)", MAKEFILE.read_text(), re.M | re.S)
    assert match, "Makefile: no PINS := line"
    return _pins(match.group(1))


def _canonical_image() -> str:
    head = _doc("raycluster.yaml", "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return head["image"]


# -- one test per rule -------------------------------------------------------------------------------------------


def test_cluster_dir_has_the_expected_files():
    names = {p.name for p in CLUSTER.iterdir()}
    expected = {"raycluster.yaml", "rayjob.yaml", "raycronjob.yaml", "cronjob.yaml", "aws.yaml", "Dockerfile",
                "README.md"}
    assert expected <= names, f"missing: {sorted(expected - names)}"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_yaml_parses_and_no_document_is_empty(path):
    docs = _documents(path)
    assert docs, f"{path.name}: no YAML document"
    assert all(isinstance(d, dict) and d for d in docs), f"{path.name}: an empty or non-mapping document"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_yaml_starts_with_the_command_that_uses_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"cluster/{path.name}" in first, f"{path.name}: first line {first!r}"


def test_one_image_everywhere():
    image = _canonical_image()
    assert image == "ghcr.io/example/distill-pipeline:0.1.0"
    images = _values("image")  # every container, and aws.yaml's docker.image
    assert {name for name, _ in images} == {p.name for p in YAMLS}, "a YAML file names no image"
    assert [(n, i) for n, i in images if i != image] == []
    assert re.findall(r"docker build .*-t (\S+)", DOCKERFILE.read_text()) == [image], "Dockerfile's build comment"


def test_ray_version_is_the_same_everywhere():
    import ray

    version = _makefile_pins()["ray"]
    assert version == ray.__version__ == "2.60.0"
    ray_versions = _values("rayVersion")
    assert len(ray_versions) == 3, ray_versions  # RayCluster, RayJob, RayCronJob
    assert [(n, v) for n, v in ray_versions if v != version] == []
    assert _pins(DOCKERFILE.read_text())["ray"] == version
    assert _pins((ROOT / "pyproject.toml").read_text())["ray"] == version


def test_every_distill_subcommand_exists_in_the_cli():
    argvs = _distill_argvs()
    assert {name for name, _ in argvs} >= {"rayjob.yaml", "raycronjob.yaml", "cronjob.yaml"}
    choices = _cli_subcommands()
    unknown = [(name, argv[0]) for name, argv in argvs if argv[0] not in choices]
    assert unknown == [], f"not a `distill` subcommand (known: {sorted(choices)})"


def test_every_distill_command_line_parses():
    parser = _cli_parser()
    for name, argv in _distill_argvs():
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{name}: `distill {shlex.join(argv)}` is refused by the CLI's parser (see stderr)")


def test_every_spec_with_its_overrides_is_valid():
    from pipeline.spec import load_spec

    for name, argv in _distill_argvs():
        spec_path = ROOT / "jobs" / Path(argv[1]).relative_to("/app/jobs")  # the image has jobs/ at /app/jobs
        overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
        assert load_spec(spec_path, overrides).output.root.startswith("s3://"), f"{name}: nodes share no disk"


def test_gpu_groups_ask_for_gpus_by_the_right_resource_name():
    for name, spec in _ray_cluster_specs():
        gpu_groups = [g for g in spec["workerGroupSpecs"] if "gpu" in g["groupName"]]
        assert len(gpu_groups) == 1, f"{name}: one GPU worker group"
        for container in gpu_groups[0]["template"]["spec"]["containers"]:
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
    aws = _doc("aws.yaml")["available_node_types"]
    gpu_types = [t for t in aws if "gpu" in t]
    assert gpu_types and all(aws[t]["resources"]["GPU"] >= 1 for t in gpu_types)


def test_every_pod_gets_the_auth_token_from_the_secret():
    expected = [{"name": "RAY_AUTH_MODE", "value": "token"},
                {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "ray-auth-token", "key": "token"}}}]
    kubernetes = [p for p in YAMLS if p.name != "aws.yaml"]
    containers = [(p.name, c) for p in kubernetes for d in _documents(p) for k, v in _walk(d) if k == "containers"
                  for c in v]
    autoscalers = [(n, spec["autoscalerOptions"]) for n, spec in _ray_cluster_specs()]
    assert len(containers) >= 12  # 3 Ray clusters x 3 groups, 2 RayJob submitters, the CronJob's container
    missing = [(n, c.get("name")) for n, c in containers + autoscalers if c.get("env") != expected]
    assert missing == [], "these lack RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from Secret ray-auth-token"


def test_head_runs_no_ray_work():
    for name, spec in _ray_cluster_specs():
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
    aws = _doc("aws.yaml")
    assert aws["available_node_types"][aws["head_node_type"]]["resources"]["CPU"] == 0


def test_cronjob_submits_to_the_rayclusters_head_service():
    cluster_name = _doc("raycluster.yaml", "RayCluster")["metadata"]["name"]
    argv = next(argv for name, argv in _distill_argvs() if name == "cronjob.yaml")
    address = argv[argv.index("--address") + 1]
    assert urlparse(address).hostname == f"{cluster_name}-head-svc"
    assert urlparse(address).port == 8265  # the dashboard's Job API


def test_dockerfile_pins_match_the_makefile():
    makefile, dockerfile = _makefile_pins(), _pins(DOCKERFILE.read_text())
    assert makefile["torch"] == dockerfile["torch"] == "2.13.0"
    assert makefile["deepspeed"] == dockerfile["deepspeed"] == "0.19.8"
    assert {k: v for k, v in makefile.items() if dockerfile.get(k) != v} == {}


def test_aws_config_is_valid_for_the_ray_cluster_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_doc("aws.yaml")))  # Ray's own JSON schema; no AWS call
