"""deploy/: the image definition and the KubeRay manifests parse, validate, and agree with the service's own
configuration (ports, `dsv4` flags, worker counts, images, versions).

What is validated against what:
* Kubernetes core objects (Service, Deployment) and every pod template inside the KubeRay resources: the
  Kubernetes 1.30 OpenAPI schemas in strict mode (an unknown or misspelt field is an error), as shipped by the
  `kubernetes-validate` package. 1.30 is the oldest API server these manifests claim to support.
* RayCluster and RayJob: no package on the package index ships the KubeRay CRD schemas (the `ray` wheel has
  none, there is no `kuberay` package, `codeflare-sdk` builds dicts without them), so the always-on tests check
  the fields dsv4 relies on and the rules the KubeRay operator enforces at admission for them;
  `test_kuberay_resources_validate_against_the_crds` validates whole resources against the CRDs when
  DSV4_KUBERAY_CRDS names a directory of them (a kuberay checkout's `ray-operator/config/crd/bases`).
* Commands: the RayJob entrypoint and the README's `dsv4` commands are parsed by `dsv4`'s own argparse parser,
  the gateway's by smg's.
* deploy/Dockerfile: parsed by BuildKit's own parser (the `dockerfile` package). Building it needs a Docker
  engine, CUDA and network access, none of which CI has.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from smg.launch_router import parse_router_args

from dsv4.cluster.cli import build_parser
from dsv4.wire.config import DEFAULT_PORT

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
KUBERNETES_VERSION = "1.30"
PYPROJECT = (ROOT / "pyproject.toml").read_text()   # read with regexes: tomllib needs Python 3.11
VERSION = re.search(r'^version = "(.+)"$', PYPROJECT, re.M).group(1)
PACKAGE_DIRS = set(re.findall(r'^"dsv4\.\w+" = "(\w+)"$', PYPROJECT, re.M))   # [tool.setuptools.package-dir]
EXPECTED_KINDS = {
    "raycluster.yaml": ["RayCluster"],
    "serve/rayjob.yaml": ["RayJob"],
    "serve/service.yaml": ["Service"],
    "serve/gateway.yaml": ["Deployment", "Service"],
}
GPU = "nvidia.com/gpu"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((KUBERAY / name).read_text()) if doc is not None]


def one(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in load(name) if d["kind"] == kind]
    return doc


def all_docs() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(KUBERAY.rglob("*.yaml")):
        for doc in load(str(path.relative_to(KUBERAY))):
            yield str(path.relative_to(KUBERAY)), doc


def cluster_specs() -> dict[str, dict[str, Any]]:
    """The two RayCluster specs: the standalone cluster's and the serving RayJob's."""
    return {"raycluster": one("raycluster.yaml", "RayCluster")["spec"],
            "rayjob": one("serve/rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]}


def pod_templates(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]


def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]   # KubeRay runs `ray start` in the first container


def parse_dsv4(command: str) -> Any:
    """`... dsv4 SUBCOMMAND FLAGS` parsed by the real `dsv4` parser (argparse exits on an unknown flag)."""
    words = shlex.split(command)
    words = words[words.index("dsv4") + 1:]
    try:
        return build_parser().parse_args(words)
    except SystemExit:
        pytest.fail(f"`dsv4 {shlex.join(words)}` is not a valid dsv4 command (see the argparse message above)")


def serve_args() -> Any:
    args = parse_dsv4(one("serve/rayjob.yaml", "RayJob")["spec"]["entrypoint"])
    assert args.command == "serve"
    return args


def num_worker_gpus(spec: dict[str, Any]) -> int:
    total = 0
    for group in spec["workerGroupSpecs"]:
        limits = ray_container(group["template"])["resources"]["limits"]
        total += group["replicas"] * int(limits.get(GPU, 0))
    return total


# --- every file parses, and validates where a schema can be had offline -------------------------------------------

def test_every_manifest_parses_into_the_expected_objects():
    found: dict[str, list[str]] = {}
    for name, doc in all_docs():
        assert {"apiVersion", "kind", "metadata"} <= set(doc), name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), name
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "dsv4", name
        found.setdefault(name, []).append(doc["kind"])
    assert found == EXPECTED_KINDS


@pytest.mark.parametrize("name, kind", [(name, doc["kind"]) for name, doc in all_docs()
                                        if not doc["apiVersion"].startswith("ray.io/")])
def test_core_objects_validate_against_the_kubernetes_schema(name, kind):
    kubernetes_validate.validate(one(name, kind), KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("owner", ["raycluster", "rayjob"])
def test_pod_templates_in_kuberay_resources_validate_against_the_kubernetes_schema(owner):
    for group, template in pod_templates(cluster_specs()[owner]):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)


# --- KubeRay: the fields dsv4 relies on, and the operator's admission rules for them ------------------------------

@pytest.mark.parametrize("owner", ["raycluster", "rayjob"])
def test_the_ray_clusters_have_a_cpu_head_and_a_fixed_gpu_worker_group(owner):
    spec = cluster_specs()[owner]
    assert spec["rayVersion"] == dockerfile_args("engine")["RAY_VERSION"]
    assert spec["enableInTreeAutoscaling"] is False
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    assert GPU not in json.dumps(ray_container(head["template"])["resources"])
    for group in spec["workerGroupSpecs"]:
        # KubeRay requires min and max without autoscaling; equal to replicas, the worker count cannot drift.
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"] >= 1
    for _, template in pod_templates(spec):
        assert "restartPolicy" not in template["spec"]   # SidecarMode requires it unset (or Never)
    for params in [head["rayStartParams"], *(g["rayStartParams"] for g in spec["workerGroupSpecs"])]:
        assert all(isinstance(v, str) for v in params.values()), params   # the CRD: map[string]string
        assert "labels" not in params                                     # rejected by the operator


def test_the_serving_rayjob_runs_its_driver_on_the_head_in_sidecar_mode():
    spec = one("serve/rayjob.yaml", "RayJob")["spec"]
    assert spec["submissionMode"] == "SidecarMode"   # other modes wait for a Ready head, which waits for the job
    assert "clusterSelector" not in spec and "submitterPodTemplate" not in spec and "submitterConfig" not in spec
    # A job that asks for resources may run its driver on a worker node; the gRPC server must be on the head.
    assert not {"entrypointNumCpus", "entrypointNumGpus", "entrypointResources"} & set(spec)
    assert spec["backoffLimit"] >= 1 and spec["shutdownAfterJobFinishes"] is True


def test_the_standalone_cluster_is_the_serving_cluster_without_serving_probes():
    """raycluster.yaml and the RayJob's rayClusterSpec are two copies of one cluster: they may differ only in the
    head's gRPC probes, its component label and the standalone cluster's /data volume for batch outputs."""
    def normalized(spec: dict[str, Any]) -> dict[str, Any]:
        spec = copy.deepcopy(spec)
        head = spec["headGroupSpec"]["template"]
        head["metadata"]["labels"].pop("app.kubernetes.io/component")
        container = ray_container(head)
        for probe in PROBES:
            container.pop(probe, None)
        container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "data"]
        head["spec"]["volumes"] = [v for v in head["spec"]["volumes"] if v["name"] != "data"]
        return spec

    specs = cluster_specs()
    assert normalized(specs["raycluster"]) == normalized(specs["rayjob"])
    # Probes on a port that only a submitted job serves would restart an idle cluster's head forever.
    assert not set(PROBES) & set(ray_container(specs["raycluster"]["headGroupSpec"]["template"]))


# --- agreement with the service ------------------------------------------------------------------------------------

def test_the_serve_entrypoint_is_a_dsv4_serve_command_for_this_cluster():
    args = serve_args()
    spec = cluster_specs()["rayjob"]
    # The driver runs on the GPU-less head: left to their defaults, device and worker count are read off it.
    assert args.device == "cuda"
    assert args.workers == num_worker_gpus(spec) == 8
    assert (args.host, args.port) == ("0.0.0.0", DEFAULT_PORT)
    for _, template in pod_templates(spec):   # the checkpoint is on a volume every pod mounts
        mounts = [m["mountPath"] for m in ray_container(template)["volumeMounts"]]
        assert any(args.model.startswith(mount + "/") for mount in mounts), (args.model, mounts)


def test_the_grpc_port_is_the_same_everywhere():
    spec = cluster_specs()["rayjob"]
    head = ray_container(spec["headGroupSpec"]["template"])
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["grpc"] == serve_args().port == DEFAULT_PORT
    for probe in PROBES:   # grpc.health.v1, Kubernetes' native gRPC probe, on the served port
        assert head[probe]["grpc"] == {"port": DEFAULT_PORT}, probe
    assert DEFAULT_PORT in [int(p) for p in dockerfile_instructions("engine", "EXPOSE")[0].value]
    assert ray_container(cluster_specs()["raycluster"]["headGroupSpec"]["template"])["ports"] == head["ports"]


def test_the_grpc_service_selects_only_the_serving_head():
    service = one("serve/service.yaml", "Service")
    (port,) = service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (DEFAULT_PORT, "grpc")
    selector = service["spec"]["selector"].items()
    labels = {owner: spec["headGroupSpec"]["template"]["metadata"]["labels"].items()
              for owner, spec in cluster_specs().items()}
    assert selector <= labels["rayjob"]
    assert not selector <= labels["raycluster"]   # a cluster that does not serve never gets gRPC traffic
    for name, doc in all_docs():
        if doc["kind"] in ("Deployment", "Service") and doc is not service:
            pod_labels = doc["spec"].get("template", {}).get("metadata", {}).get("labels", {})
            assert not selector <= pod_labels.items(), name


def test_the_gateway_talks_to_the_grpc_service():
    deployment = one("serve/gateway.yaml", "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:2] == ["smg", "launch"]
    router = parse_router_args(container["command"][2:])   # smg's own parser
    service = one("serve/service.yaml", "Service")
    assert router.worker_urls == [f"grpc://{service['metadata']['name']}:{DEFAULT_PORT}"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (router.port, router.prometheus_port) == (ports["http"], ports["metrics"])
    assert router.shutdown_grace_period_secs < pod["terminationGracePeriodSeconds"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readiness", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/liveness", "port": "http"}
    gateway_service = one("serve/gateway.yaml", "Service")
    assert gateway_service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["targetPort"] for p in gateway_service["spec"]["ports"]} <= set(ports)
    # the image's default command points at the same Service
    cmd = dockerfile_instructions("gateway", "CMD")[0].value
    assert cmd[cmd.index("--worker-urls") + 1] == router.worker_urls[0]


@pytest.mark.parametrize("owner", ["raycluster", "rayjob"])
def test_gpu_pods_have_the_resources_the_workers_ask_for(owner):
    for group, template in pod_templates(cluster_specs()[owner]):
        container = ray_container(template)
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests == limits, group   # Ray reads its resources off the limits; no overcommit
        shm = [v for v in template["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory", group
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"], group
        if group == "head":
            continue
        gpus = int(limits[GPU])
        assert gpus >= 1 and int(limits["cpu"]) >= gpus, group   # each worker actor's bundle is {CPU: 1, GPU: 1}
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1", group
        assert any(t["key"] == GPU for t in template["spec"]["tolerations"]), group


# --- images ---------------------------------------------------------------------------------------------------------

def make_images() -> dict[str, str]:
    """The image tags deploy/Makefile builds, by Dockerfile target (read from `make -n`, the Makefile's own view)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    output = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(DEPLOY), "images"], check=True,
                            capture_output=True, text=True, env={"PATH": os.environ["PATH"]}).stdout
    images = {}
    for line in output.splitlines():
        words = shlex.split(line)
        if "build" in words:
            images[words[words.index("--target") + 1]] = words[words.index("-t") + 1]
    return images


def test_the_manifests_run_the_images_the_makefile_builds():
    images = make_images()
    assert set(images) == {"engine", "gateway"}
    assert all(image.endswith(f":{VERSION}") for image in images.values()), images   # the project's version
    for owner, spec in cluster_specs().items():
        for group, template in pod_templates(spec):
            assert {c["image"] for c in template["spec"]["containers"]} == {images["engine"]}, (owner, group)
    deployment = one("serve/gateway.yaml", "Deployment")
    assert {c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]} == {images["gateway"]}


# --- the Dockerfile --------------------------------------------------------------------------------------------------

def dockerfile_stages() -> dict[str, list[dockerfile.Command]]:
    """Instructions by stage name ("" for the global ARGs before the first FROM), as BuildKit parses them."""
    stages: dict[str, list[dockerfile.Command]] = {"": []}
    current = ""
    for command in dockerfile.parse_file(str(DEPLOY / "Dockerfile")):
        if command.cmd == "FROM":
            assert len(command.value) == 3 and command.value[1].upper() == "AS", command.original
            current = command.value[2]
            stages[current] = [command]
        else:
            stages[current].append(command)
    return stages


def dockerfile_instructions(stage: str, cmd: str) -> list[dockerfile.Command]:
    return [c for c in dockerfile_stages()[stage] if c.cmd == cmd]


def dockerfile_args(stage: str) -> dict[str, str]:
    return dict(c.value[0].split("=", 1) for c in dockerfile_instructions(stage, "ARG"))


def test_the_engine_image_is_cuda_13_with_the_kernels_built_at_image_build_time():
    stages = dockerfile_stages()
    assert set(stages) == {"", "gateway", "engine"}
    assert dockerfile_args("")["CUDA_IMAGE"].startswith("nvidia/cuda:13.")
    assert stages["engine"][0].value[0] == "${CUDA_IMAGE}"
    runs = [c.value[0] for c in dockerfile_instructions("engine", "RUN")]
    install = next(i for i, run in enumerate(runs) if run.startswith('pip install ".[structured]" '))
    prebuild = next(i for i, run in enumerate(runs) if "python -m dsv4.kernels.build --arch" in run)
    assert prebuild > install   # compiled from the installed package, for the architectures named at build time
    assert "torch==${TORCH_VERSION}" in runs[install - 1] and "cu13" in dockerfile_args("engine")["TORCH_INDEX_URL"]
    env = {}
    for command in dockerfile_instructions("engine", "ENV"):
        env.update(zip(command.value[::2], command.value[1::2], strict=True))
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert "DSV4_KERNEL_CACHE" in env and "DSV4_CUDA_ARCH" not in env   # a runtime arch would defeat the GPU's own
    assert dockerfile_instructions("engine", "CMD")[0].value[:2] == ("dsv4", "serve")


def test_the_image_copies_every_package_and_the_build_context_holds_nothing_else():
    copied = {c.value[0] for c in dockerfile_instructions("engine", "COPY")}
    assert len(PACKAGE_DIRS) >= 6 and PACKAGE_DIRS | {"pyproject.toml"} <= copied
    allowed = {line[1:].rstrip("/") for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    ignore = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*" and copied - {"./"} <= allowed | {"README.md"} and "README.md" in allowed


def test_the_gateway_image_pins_an_smg_the_test_extras_accept():
    """The API tests verify whatever smg the test extras install; the image pins one release of that range."""
    (requirement,) = [Requirement(r) for r in metadata.requires("dsv4") if Requirement(r).name == "smg"]
    assert requirement.specifier.contains(dockerfile_args("gateway")["SMG_VERSION"])


# --- documentation ---------------------------------------------------------------------------------------------------

def test_the_readme_deploy_commands_are_valid_dsv4_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Deploy\n"):]
    section = section[:section.index("\n## ", 1)]
    code = "\n".join(re.findall(r"^```bash\n(.*?)^```", section, re.M | re.S)).replace("\\\n", " ")
    commands = [line.split(" #")[0] for line in code.splitlines() if re.search(r"\bdsv4 (serve|batch)\b", line)]
    assert len(commands) >= 5, commands
    for command in commands:
        parse_dsv4(command[command.index("dsv4 "):])


# --- KubeRay CRDs, where they can be had -----------------------------------------------------------------------------

def strict(schema: Any) -> Any:
    """A CRD's structural schema as JSON Schema that rejects unknown fields (the API server prunes them silently,
    which is how a misspelt field goes unnoticed)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def test_kuberay_resources_validate_against_the_crds():
    crd_dir = os.environ.get("DSV4_KUBERAY_CRDS")
    if not crd_dir:
        pytest.skip("set DSV4_KUBERAY_CRDS to a directory of KubeRay CRDs (ray-operator/config/crd/bases)")
    schemas = {}
    for path in Path(crd_dir).glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            api_version = f"{crd['spec']['group']}/{version['name']}"
            schemas[(api_version, crd["spec"]["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    checked = 0
    for name, doc in all_docs():
        if doc["apiVersion"].startswith("ray.io/"):
            schema = strict(schemas[(doc["apiVersion"], doc["kind"])])
            errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=lambda e: e.path)
            assert not errors, f"{name}: " + "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
            checked += 1
    assert checked == 2
