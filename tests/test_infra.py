"""Checks that the production manifests in infra/ agree with each other and with the code.

Nothing here builds an image or talks to a cluster: the files are parsed and
cross-checked, so a version bump, a renamed Service or a resized GPU worker that
is not followed everywhere fails in CI instead of at 2 a.m. in the cluster.
"""
from __future__ import annotations

import fnmatch
import importlib
import json
import re
import sys
import tomllib
from decimal import Decimal
from importlib.metadata import version as installed_version
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "Dockerfile"
DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
JOB_TEMPLATE = INFRA / "k8s" / "work-pool-job-template.json"
SECRET = INFRA / "k8s" / "storage-secret.example.yaml"
PREFECT_YAML = INFRA / "prefect.yaml"
RAY_CLIENT_PORT = 10001


# ---------------------------------------------------------------- helpers


def load_yaml(path: Path) -> dict:
    """The single YAML document in ``path``."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


def pyproject() -> dict:
    """pyproject.toml, parsed."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instr, _, args = full.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def dockerfile_args() -> dict[str, str]:
    """Defaults of every ``ARG NAME=default`` in the Dockerfile."""
    args = {}
    for instr, rest in dockerfile_instructions():
        if instr == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
    return args


def expand(text: str, args: dict[str, str]) -> str:
    """Substitute ``${NAME}`` and ``$NAME`` with the ARG defaults, as docker build does."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def copy_sources() -> list[str]:
    """Source paths of every COPY in the Dockerfile (flags such as --chown dropped)."""
    sources = []
    for instr, rest in dockerfile_instructions():
        if instr == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            sources.extend(parts[:-1])  # the last one is the destination
    return sources


_QUANTITY = re.compile(
    r"^(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:(?P<exp>[eE][+-]?[0-9]+)|(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?)$")
_SUFFIX = {
    None: Decimal(1), "m": Decimal("0.001"),
    "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}


def quantity(value) -> Decimal:
    """A Kubernetes resource quantity ('500m', '8Gi', '16G', '1e3', 4) as an exact number."""
    m = _QUANTITY.match(str(value).strip())
    if not m:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number = Decimal(m["num"])
    if m["exp"]:
        return number * Decimal(10) ** int(m["exp"][1:])
    return number * _SUFFIX[m["suffix"]]


def raycluster() -> dict:
    return load_yaml(RAYCLUSTER)


def job_template() -> dict:
    return json.loads(JOB_TEMPLATE.read_text())


def gpu_group(rc: dict) -> dict:
    """The worker group named ``gpu``."""
    groups = [g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert len(groups) == 1, "expected exactly one worker group named 'gpu'"
    return groups[0]


def ray_container(pod_template: dict) -> dict:
    """The Ray container of a KubeRay pod template (KubeRay treats the first one as Ray's)."""
    return pod_template["spec"]["containers"][0]


def variable_defaults(template: dict) -> dict:
    """Each work-pool variable's default, as the worker uses it when a deployment sets none."""
    return {name: prop.get("default") for name, prop in template["variables"]["properties"].items()}


_PLACEHOLDER = re.compile(r"\{\{\s*([\w.$-]+)\s*\}\}")


def placeholders(obj) -> set[str]:
    """Every ``{{ name }}`` inside the strings of a nested JSON value."""
    if isinstance(obj, str):
        return set(_PLACEHOLDER.findall(obj))
    if isinstance(obj, dict):
        return set().union(*(placeholders(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(placeholders(v) for v in obj)) if obj else set()
    return set()


def render(obj, values: dict):
    """Fill placeholders like Prefect's apply_values: a lone placeholder takes the value itself."""
    if isinstance(obj, str):
        lone = _PLACEHOLDER.fullmatch(obj.strip())
        if lone:
            return values.get(lone.group(1))
        return _PLACEHOLDER.sub(lambda m: str(values.get(m.group(1), "")), obj)
    if isinstance(obj, dict):
        return {k: render(v, values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [render(v, values) for v in obj]
    return obj


def job_container(template: dict | None = None) -> dict:
    """The flow-run container of the job manifest, rendered with the variables' defaults."""
    template = template or job_template()
    manifest = render(template["job_configuration"]["job_manifest"], variable_defaults(template))
    return manifest["spec"]["template"]["spec"]["containers"][0]


def all_containers() -> list[tuple[str, dict]]:
    """(label, container) for every container the manifests start."""
    rc = raycluster()
    found = [("job template", job_container())]
    for label, pod in [("ray head", rc["spec"]["headGroupSpec"]["template"])] + [
            (f"worker group {g['groupName']}", g["template"]) for g in rc["spec"]["workerGroupSpecs"]]:
        found += [(f"{label}/{c['name']}", c) for c in pod["spec"]["containers"]]
    return found


def secret_refs(container: dict) -> list[str]:
    """Names of the Secrets a container loads with ``envFrom``."""
    return [src["secretRef"]["name"] for src in container.get("envFrom") or [] if "secretRef" in src]


# ---------------------------------------------------------------- the helpers themselves


@pytest.mark.parametrize("text,expected", [
    ("500m", Decimal("0.5")), ("2", Decimal(2)), (16, Decimal(16)), ("1.5", Decimal("1.5")),
    ("8Gi", Decimal(8 * 2**30)), ("16G", Decimal(16 * 10**9)), ("512Mi", Decimal(512 * 2**20)),
    ("1e3", Decimal(1000)), ("1E", Decimal(10**18)), ("100k", Decimal(100_000)),
])
def test_quantity_parser(text, expected):
    assert quantity(text) == expected


@pytest.mark.parametrize("bad", ["", "8GB", "1.2.3", "abc", "-1", "16 Gi"])
def test_quantity_parser_refuses_garbage(bad):
    with pytest.raises(ValueError):
        quantity(bad)


# ---------------------------------------------------------------- parsing


def test_manifests_parse():
    rc = raycluster()
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    secret = load_yaml(SECRET)
    assert (secret["apiVersion"], secret["kind"]) == ("v1", "Secret")
    template = job_template()
    assert set(template) == {"job_configuration", "variables"}
    assert dockerfile_instructions()[0][0] in ("ARG", "FROM")


# ---------------------------------------------------------------- the image


def test_dockerfile_base_image_matches_the_venv_ray_and_python():
    froms = [expand(rest, dockerfile_args()) for instr, rest in dockerfile_instructions() if instr == "FROM"]
    assert len(froms) == 1, "one stage expected: the driver and the cluster share this image"
    image, _, tag = froms[0].split()[0].rpartition(":")
    assert image == "rayproject/ray"
    ray_version, py_tag, flavour = tag.split("-")
    # Ray Client refuses a client whose Ray or Python differs from the cluster's
    assert ray_version == installed_version("ray"), "ARG RAY_VERSION must equal the Ray in .venv"
    pinned = [d for d in pyproject()["project"]["dependencies"] if d.startswith("ray[")]
    assert pinned == [f"ray[data,client]=={ray_version}"], "pyproject must pin the image's Ray"
    # the image's Python, which flow-run pods and the cluster share; not the test's interpreter,
    # which may be any the README allows (3.11 or newer)
    assert py_tag == "py311"
    assert flavour == "gpu"


def test_dockerfile_pins_ray_to_the_base_image_version():
    installs = [rest for instr, rest in dockerfile_instructions() if instr == "RUN" and "pip install" in rest]
    assert any('"ray[data,client]==${RAY_VERSION}"' in rest for rest in installs), \
        "pip must not be free to replace the base image's Ray"


def test_raycluster_ray_version_matches_the_image():
    assert str(raycluster()["spec"]["rayVersion"]) == dockerfile_args()["RAY_VERSION"]


@pytest.mark.parametrize("source", copy_sources())
def test_dockerfile_copies_only_existing_paths(source):
    assert (REPO / source).exists(), f"Dockerfile COPYs {source}, which is not in the repository"


def test_dockerignore_keeps_local_state_out_and_copied_paths_in():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in (".venv", ".git"):
        assert needed in patterns
    for source in copy_sources():
        src = source.rstrip("/")
        hits = [p for p in patterns if fnmatch.fnmatch(src, p.rstrip("/"))
                or any(fnmatch.fnmatch(part, p.rstrip("/")) for part in Path(src).parts)]
        assert not hits, f"{source} is COPYed but excluded by {hits} in {DOCKERIGNORE.name}"


def test_dockerfile_runs_as_non_root():
    users = [expand(rest, dockerfile_args()) for instr, rest in dockerfile_instructions() if instr == "USER"]
    assert users, "the Dockerfile never sets USER"
    uid = users[-1].partition(":")[0]
    # numeric, or a pod with runAsNonRoot cannot verify it and refuses to start
    assert uid.isdigit() and int(uid) != 0, f"the image must end as a numeric non-root user, not {users[-1]!r}"


def test_workdir_is_where_flow_runs_start():
    workdirs = [rest for instr, rest in dockerfile_instructions() if instr == "WORKDIR"]
    assert workdirs, "the Dockerfile sets no WORKDIR"
    workdir = workdirs[-1]
    assert job_container().get("workingDir") == workdir
    # any pull step that changes directory must land where the code was copied
    steps = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("set_working_directory"):
                    steps.append(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(load_yaml(PREFECT_YAML))
    for step in steps:
        assert step["directory"] == workdir


# ---------------------------------------------------------------- one image everywhere


def test_same_image_with_the_pyproject_version_everywhere():
    rc = raycluster()
    images = {
        "ray head": ray_container(rc["spec"]["headGroupSpec"]["template"])["image"],
        "gpu workers": ray_container(gpu_group(rc)["template"])["image"],
        "job template": variable_defaults(job_template())["image"],
    }
    assert job_container()["image"] == images["job template"]
    assert len(set(images.values())) == 1, f"driver and cluster images differ: {images}"
    name, _, tag = images["ray head"].rpartition(":")
    assert name and "/" in name
    assert tag == pyproject()["project"]["version"]


# ---------------------------------------------------------------- the RayCluster


def test_autoscaling_gpu_group():
    rc = raycluster()
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    group = gpu_group(rc)
    assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    assert group["maxReplicas"] >= 1


def test_gpu_worker_resources_match_what_ray_advertises():
    group = gpu_group(raycluster())
    container = ray_container(group["template"])
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    params = group["rayStartParams"]
    # Ray schedules by num-gpus / num-cpus; Kubernetes enforces the limits
    assert quantity(requests["nvidia.com/gpu"]) == quantity(limits["nvidia.com/gpu"]) == quantity(params["num-gpus"])
    assert quantity(params["num-gpus"]) >= 1
    assert quantity(limits["cpu"]) == quantity(params["num-cpus"])
    assert "memory" in limits


def test_gpu_workers_land_on_gpu_nodes_with_a_memory_backed_shm():
    pod = gpu_group(raycluster())["template"]["spec"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])) or pod.get("nodeSelector")
    head = raycluster()["spec"]["headGroupSpec"]["template"]["spec"]  # the proxied drivers' object store
    for spec in (pod, head):
        shm = [m for m in ray_container({"spec": spec})["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert len(shm) == 1
        volume = next(v for v in spec["volumes"] if v["name"] == shm[0]["name"])
        assert volume["emptyDir"]["medium"] == "Memory"


def test_head_is_cpu_only_and_reachable():
    head = raycluster()["spec"]["headGroupSpec"]
    params = head["rayStartParams"]
    assert quantity(params["num-gpus"]) == 0
    assert params["dashboard-host"] == "0.0.0.0"
    container = ray_container(head["template"])
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert quantity(resources[kind].get("nvidia.com/gpu", 0)) == 0
    assert {k: quantity(v) for k, v in resources["requests"].items()} == \
        {k: quantity(v) for k, v in resources["limits"].items()}, "head requests must equal limits"
    assert "tolerations" not in head["template"]["spec"], "the head must not take a GPU node"


@pytest.mark.parametrize("label,container", all_containers(), ids=lambda x: x if isinstance(x, str) else None)
def test_requests_never_exceed_limits(label, container):
    resources = container.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    assert requests and limits, f"{label}: set requests and limits"
    for name, requested in requests.items():
        if name in limits:
            assert quantity(requested) <= quantity(limits[name]), f"{label}: {name} request > limit"


def test_autoscaler_requests_never_exceed_limits():
    resources = raycluster()["spec"].get("autoscalerOptions", {}).get("resources", {})
    for name, requested in resources.get("requests", {}).items():
        assert quantity(requested) <= quantity(resources["limits"][name])


# ---------------------------------------------------------------- the work pool's job template


def test_ray_address_points_at_the_head_client_port():
    rc = raycluster()
    env = variable_defaults(job_template())["env"]
    address = urlparse(env["RAY_ADDRESS"])
    assert address.scheme == "ray", "a flow-run pod is not a Ray node: it connects with Ray Client"
    assert address.hostname == f"{rc['metadata']['name']}-head-svc"
    ports = {p["containerPort"] for p in ray_container(rc["spec"]["headGroupSpec"]["template"]).get("ports", [])
             if p.get("name") == "client"}
    assert ports == {RAY_CLIENT_PORT} and address.port == RAY_CLIENT_PORT


def test_jobs_run_in_the_raycluster_namespace():
    # the head Service's short DNS name resolves only within its own namespace
    namespace = raycluster()["metadata"]["namespace"]
    assert variable_defaults(job_template())["namespace"] == namespace
    assert load_yaml(SECRET)["metadata"]["namespace"] == namespace


def test_ray_pods_run_as_their_own_created_service_account():
    """Where IRSA / Workload Identity puts the storage role: the GPU workers read the images. Unset,
    they ran as `default`, and KubeRay's autoscaler account was named like the flow-run pods' one."""
    rc = raycluster()
    accounts = {rc["spec"]["headGroupSpec"]["template"]["spec"].get("serviceAccountName")}
    accounts |= {g["template"]["spec"].get("serviceAccountName") for g in rc["spec"]["workerGroupSpecs"]}
    assert accounts == {"score-images-ray"}
    assert variable_defaults(job_template())["service_account_name"] != "score-images-ray"
    assert "create serviceaccount score-images-ray" in (REPO / "docs" / "production.md").read_text()


def test_job_template_placeholders_are_declared_variables():
    template = job_template()
    declared = set(template["variables"]["properties"])
    used = {name for name in placeholders(template["job_configuration"]) if not name.startswith("prefect.")}
    assert used - declared == set(), "placeholders without a variable"
    assert declared - used == set(), "variables that no placeholder uses"


def test_job_template_keeps_the_shape_the_worker_requires():
    # prefect-kubernetes rejects a job manifest that differs from these values
    manifest = job_template()["job_configuration"]["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    pod = manifest["spec"]["template"]["spec"]
    assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
    assert pod["containers"][0]["name"] == "prefect-job"


def test_job_template_defaults():
    defaults = variable_defaults(job_template())
    assert defaults["backoff_limit"] == 0, "Prefect, not Kubernetes, decides about reruns"
    assert isinstance(defaults["finished_job_ttl"], int) and defaults["finished_job_ttl"] > 0
    assert defaults["service_account_name"]
    # every package of the project logs into the flow run's Prefect logs
    packages = {p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert set(defaults["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"].split(",")) == packages


def test_job_template_is_derived_from_the_installed_prefect_kubernetes():
    pinned = dockerfile_args()["PREFECT_KUBERNETES_VERSION"]
    assert f"prefect-kubernetes {pinned}" in job_template()["variables"]["description"]


# ---------------------------------------------------------------- credentials


def test_every_pod_loads_the_storage_secret():
    name = load_yaml(SECRET)["metadata"]["name"]
    for label, container in all_containers():
        assert secret_refs(container) == [name], f"{label} does not load the {name} Secret"
        ref = next(s["secretRef"] for s in container["envFrom"] if "secretRef" in s)
        assert ref.get("optional") is True, "IRSA / workload identity setups have no Secret"


def test_example_secret_holds_only_placeholders():
    data = load_yaml(SECRET)["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(data)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "REPLACE-ME" in data[key]


_CREDENTIAL_LIKE = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),  # GitHub tokens
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face tokens
    re.compile(r"(?i)secret[_-]?access[_-]?key\W{1,4}[A-Za-z0-9/+]{40}\b"),
    re.compile(r"postgres(?:ql)?(?:\+\w+)?://[^:/\s]+:(?!<)[^@\s]+@"),  # a password in a DB URL
]
_SCANNED = sorted(p for p in INFRA.rglob("*") if p.is_file()) + [REPO / "docs" / "production.md"]


@pytest.mark.parametrize("path", _SCANNED, ids=lambda p: str(p.relative_to(REPO)))
def test_no_credentials_in_manifests(path):
    text = path.read_text()
    for pattern in _CREDENTIAL_LIKE:
        assert not pattern.search(text), f"{path.relative_to(REPO)} holds something like a credential"


def test_no_credentials_in_job_env():
    env = variable_defaults(job_template())["env"]
    assert not {k for k in env if re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", k)}


# ---------------------------------------------------------------- the entry point


def test_console_script_exists():
    target = pyproject()["project"]["scripts"]["score-images"]
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_the_wheel_holds_every_file_the_packages_read(tmp_path):
    """The container installs a wheel, not the tree: data files must be declared (package-data)."""
    import shutil
    import subprocess
    import zipfile

    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    for package in ("deit_model", "tasks", "flows"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    data = [p.relative_to(REPO).as_posix() for package in ("deit_model", "tasks", "flows")
            for p in (REPO / package).rglob("*") if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts]
    assert data and not [f for f in data if f not in held]
