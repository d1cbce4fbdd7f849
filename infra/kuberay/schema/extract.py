"""Extract the openAPIV3Schema of KubeRay's *generated* CRDs (RayCluster, RayJob; ray.io/v1) at a release tag
into ``kuberay-<tag>-crds.json.gz``, which tests/orchestrator/test_infra.py validates infra/kuberay/*.yaml
against. The CRDs are controller-gen's output in ray-project/kuberay (ray-operator/config/crd/bases), Apache-2.0;
this file records the tag, its commit and each CRD file's last revision at that tag.

    git clone https://github.com/ray-project/kuberay /tmp/kuberay
    python infra/kuberay/schema/extract.py /tmp/kuberay v1.6.0
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import yaml

FILES = {
    "RayCluster": "ray-operator/config/crd/bases/ray.io_rayclusters.yaml",
    "RayJob": "ray-operator/config/crd/bases/ray.io_rayjobs.yaml",
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def main(repo: str, tag: str) -> Path:
    repo_path = Path(repo)
    out = {
        "source": "https://github.com/ray-project/kuberay",
        "tag": tag,
        "commit": git(repo_path, "rev-parse", f"{tag}^{{commit}}").strip(),
        "files": {},
        "schemas": {},
    }
    for kind, path in FILES.items():
        crd = yaml.safe_load(git(repo_path, "show", f"{tag}:{path}"))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        out["schemas"][kind] = version["schema"]["openAPIV3Schema"]
        out["files"][path] = git(repo_path, "log", "-1", "--format=%H", tag, "--", path).strip()
    dest = Path(__file__).parent / f"kuberay-{tag}-crds.json.gz"
    with gzip.open(dest, "wt", encoding="utf-8") as fh:
        json.dump(out, fh, sort_keys=True)
    print(f"{dest}: {', '.join(out['schemas'])} from {out['source']} {tag} ({out['commit'][:12]})")
    return dest


if __name__ == "__main__":
    main(*sys.argv[1:3])
