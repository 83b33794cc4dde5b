"""Everything under deploy/ and serve_config.yaml is valid for the tools that will read it: YAML parses,
Serve configs pass Ray Serve's own schema and raytp's config model, RayService pod templates use only
fields the Kubernetes API knows, and Dockerfiles run raytp as a non-root user."""

import re
from pathlib import Path

import pytest
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from raytp.config import RaytpConfig
from raytp.serve.server import LLMServer

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
SERVE_CONFIGS = [ROOT / "serve_config.yaml", *sorted(DEPLOY.glob("serve_config.*.yaml"))]
RAYSERVICES = sorted(DEPLOY.glob("rayservice-*.yaml"))
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*"))


def check_serve_config(config: dict) -> list[dict]:
    """Validate with Serve's schema and raytp's model; return raytp's applications."""
    ServeDeploySchema.model_validate(config)
    apps = [a for a in config["applications"] if a["import_path"] == "raytp.serve.app:build_app"]
    assert apps, "no raytp application"
    for app in apps:
        args = RaytpConfig(**app.get("args", {})).check_static()
        assert {d["name"] for d in app.get("deployments", [])} <= {"LLMServer", "OpenAIIngress"}
        for options in app.get("deployments", []):
            if options["name"] == "LLMServer":  # Serve checks some options only against the deployment itself
                bundles = [{"CPU": args.num_cpus_per_worker}] * args.tensor_parallel_size
                serve.deployment(LLMServer, name="LLMServer", placement_group_bundles=bundles).options(
                    **{k: v for k, v in options.items() if k != "name"})
    return apps


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_configs(path):
    check_serve_config(yaml.safe_load(path.read_text()))


def test_manifests_and_images_exist():
    assert {p.name for p in RAYSERVICES} == {"rayservice-xpu.yaml", "rayservice-cpu.yaml"}
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.xpu", "Dockerfile.xpu-native", "Dockerfile.cpu"}


def test_native_xpu_image_has_no_archived_intel_packages():
    """The upstream-current Intel stack: torch's own XPU wheel (xccl) and torchao, nothing IPEX-based."""
    text = (DEPLOY / "Dockerfile.xpu-native").read_text()
    installs = " ".join(ln for ln in text.splitlines() if "pip install" in ln)
    assert re.search(r"torch==2\.(\d+)\.\d+ --index-url https://download\.pytorch\.org/whl/xpu", installs)
    assert int(re.search(r"torch==2\.(\d+)", installs).group(1)) >= 8  # xccl ships with torch >= 2.8 XPU builds
    assert not re.search(r"ipex|intel[-_]extension|oneccl", installs, re.I)
    assert '".[torchao]"' in installs
    args = yaml.safe_load((DEPLOY / "serve_config.xpu_native.yaml").read_text())["applications"][0]["args"]
    assert args["device"] == "xpu" and args["quantization"] == "int4" and "low_bit" not in args


def k8s_unknown_fields(model, data, path="") -> list[str]:
    """Field names in ``data`` that the Kubernetes client's ``model`` (e.g. V1PodTemplateSpec) does not have,
    recursively through nested models, lists and maps."""
    import kubernetes.client as k8s

    if isinstance(model, str):
        if m := re.fullmatch(r"list\[(.+)\]", model):
            return [e for i, item in enumerate(data) for e in k8s_unknown_fields(m.group(1), item, f"{path}[{i}]")]
        if m := re.fullmatch(r"dict\((.+), (.+)\)", model):
            return [e for k, v in data.items() for e in k8s_unknown_fields(m.group(2), v, f"{path}.{k}")]
        if not hasattr(k8s, model):
            return []  # str, int, object, ...
        model = getattr(k8s, model)
    by_json = {v: k for k, v in model.attribute_map.items()}
    errors = []
    for key, value in data.items():
        if key not in by_json:
            errors.append(f"{path}.{key}")
        else:
            errors += k8s_unknown_fields(model.openapi_types[by_json[key]], value, f"{path}.{key}")
    return errors


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_rayservice(path):
    pytest.importorskip("kubernetes")
    svc = yaml.safe_load(path.read_text())
    assert (svc["apiVersion"], svc["kind"]) == ("ray.io/v1", "RayService")
    (app,) = check_serve_config(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    args, cluster = app["args"], svc["spec"]["rayClusterConfig"]
    tp = args["tensor_parallel_size"]
    assert args.get("placement_strategy", "STRICT_PACK") == "STRICT_PACK"  # a gang stays on one pod
    server = next(d for d in app["deployments"] if d["name"] == "LLMServer")
    assert server["autoscaling_config"]["max_replicas"] >= 2
    assert cluster["enableInTreeAutoscaling"] is True

    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        assert k8s_unknown_fields("V1PodTemplateSpec", group["template"]) == []
        spec = group["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay wants strings
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        # a pod holds exactly one TP group (Serve forbids max_replicas_per_node with placement groups, so the
        # pod's resources are what spreads replicas across pods)
        if args["device"] == "xpu":  # every GPU of a pod, advertised to Ray, is one rank
            assert int(limits["gpu.intel.com/i915"]) == int(group["rayStartParams"]["num-gpus"]) == tp
            assert int(limits["cpu"]) >= tp * args["num_cpus_per_worker"]
        else:
            assert int(group["rayStartParams"]["num-cpus"]) == tp * args["num_cpus_per_worker"] <= int(limits["cpu"])
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-gpus", "0") == "0"  # no gang on the head


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(path):
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    instructions = [ln.split()[0] for ln in lines if ln.split()[0].isupper()]
    assert instructions[0] == "FROM" and instructions[-1] == "CMD"
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    for ln in lines:
        if ln.startswith("COPY "):
            *sources, _dest = [a for a in ln.split()[1:] if not a.startswith("--")]
            assert all((ROOT / s).exists() for s in sources), ln
    copied = re.search(r"COPY .*?(deploy/serve_config\.\w+\.yaml)", path.read_text()).group(1)
    assert (ROOT / copied).exists()
    assert re.search(r'serve"?,? "?run"?,? "?serve_config\.yaml', lines[-1]), lines[-1]
    assert re.search(r"^FROM \S+:\S+", path.read_text(), re.M), "pin the base image tag"
