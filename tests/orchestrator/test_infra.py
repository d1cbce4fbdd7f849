"""The cluster definitions agree with the CLI: every entry point is an `hkd` stage, every config group exists."""
import re
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import COMMANDS
from orchestrator.config import CONF_DIR

ROOT = Path(__file__).resolve().parents[2]


def _hkd_commands(text: str) -> list[list[str]]:
    return [m.split() for m in re.findall(r"(?<![\w/-])hkd[ \t]+[^\n'\"`#]+", text)]


def _check(cmd: list[str], where: str) -> None:
    assert cmd[1] in COMMANDS + ("--help",), f"{where}: unknown hkd command {cmd[1]!r}"
    if cmd[1] == "sweep" and len(cmd) > 2:         # a sweep named in prose has no file
        assert (ROOT / cmd[2]).is_file(), f"{where}: sweep file {cmd[2]} does not exist"
    for tok in cmd[2:]:
        if tok.startswith("-") or "=" not in tok:
            continue
        key, value = tok.split("=", 1)
        if "." not in key and "<" not in value:   # a config group choice (not a <placeholder>): the file must exist
            assert (CONF_DIR / key / f"{value}.yaml").is_file(), f"{where}: {key}={value} is not a config option"


@pytest.mark.parametrize("path", ["infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob.yaml",
                                  "infra/launcher/cluster.yaml", "infra/README.md", "README.md", "sweeps/README.md"])
def test_entry_points_name_real_stages_and_groups(path):
    text = (ROOT / path).read_text()
    cmds = _hkd_commands(text)
    if path != "README.md":
        assert cmds, f"{path} runs no hkd command"
    for c in cmds:
        _check(c, path)


def test_rayjob_entrypoint_composes(monkeypatch):
    from orchestrator.config import compose

    monkeypatch.setenv("HKD_S3_BUCKET", "cluster-bucket")      # storage=s3 takes the bucket from the environment
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
        assert "RAY_AUTH_MODE" in text and "value: token" in text
        assert "secretRef" in text and "AWS_SECRET_ACCESS_KEY" not in text


def test_dockerfile_copies_what_exists_and_bakes_weights():
    text = (ROOT / "infra/docker/Dockerfile").read_text()
    for src in re.findall(r"^COPY\s+(\S+)\s", text, re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert "python -m hkd_core weights" in text
