"""What ``hkd`` prints after a command: the results, the headline, the registry's alias, the MLflow UI's address."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | None, obj) -> None:
    if path:
        Path(path).write_text(json.dumps(obj, indent=1, default=str))


def print_results(res: dict) -> None:
    """The tail of a stage command: skipped stages, the headline (KID ratio first), where the artifacts are."""
    print(f"\nstages skipped (already done): {', '.join(res.get('_skipped', [])) or 'none'}")
    if "evaluate" in res:
        from orchestrator.stages.headline import headline_lines

        for line in headline_lines(res["evaluate"]["metrics"]):
            print(line)
    print(f"artifacts: {res['_storage_root']}/")
    if "distill" in res and res["distill"].get("model_uri"):
        print(
            f"  model: {res['distill']['model_uri']}   trajectories: {res['trajectories']['train']['uri']}/"
        )
    print_champion(res.get("evaluate", {}).get("champion"))
    print_ui(res["_tracking_uri"], res["_experiment_id"], res["_parent_run_id"])


def write_headline(path: str, res: dict, command: str, overrides: list[str], name: str | None) -> None:
    """``--headline FILE``: the evaluate stage's headline with the name it carries and the command that made it."""
    if "evaluate" not in res:
        return
    head = {
        **res["evaluate"].get("headline", {}),
        "name": name or (" ".join(overrides) if overrides else "main job"),
        "command": " ".join(["hkd", command, *overrides]),
    }
    Path(path).write_text(json.dumps(head, indent=1, default=float) + "\n")


def print_champion(champ: dict | None, what: str = "") -> None:
    """Where the registry's alias went (orchestrator/services/registry.py)."""
    if champ:
        print(
            f"registry: {champ['model']} version {champ['version']}{what} "
            + (
                f"is now the {champ['alias']} (models:/{champ['model']}@{champ['alias']})"
                if champ["moved"]
                else f"stays a challenger ({champ['why']})"
            )
        )


def print_ui(uri: str, experiment_id: str, run_id: str, extra: str = "") -> None:
    if uri.startswith("http"):
        print(f"MLflow UI: {uri}/#/experiments/{experiment_id}/runs/{run_id}{extra}")
    else:
        print(f"MLflow (a local store): mlflow ui --backend-store-uri {uri}   (run {run_id})")


def print_sweep(summary: dict) -> None:
    from orchestrator.sweep.results import to_markdown

    print(to_markdown(summary))
    if summary.get("preset"):
        print(
            f"best config written as an experiment preset ({summary['preset_path']}): "
            f"hkd pipeline experiment={summary['preset']}"
        )
    champ = summary.get("champion")
    print_champion(
        champ, f" (trial {champ['trial_id']}, the lowest FID at N = {champ['n']})" if champ else ""
    )
    print(f"sweep id: {summary['sweep_id']} (resume with --resume {summary['sweep_id']})")
    print_ui(summary["_tracking_uri"], summary["_experiment_id"], summary["_sweep_run_id"])


def print_study(res: dict) -> None:
    print(res["markdown"])
    curves = (
        ", study_curves.png (KID and FID against kimg and training seconds)" if res.get("curve_n") else ""
    )
    print(f"table and figures: {res['folder']}/study.md, study_fid.png{curves}")
    print_ui(
        res["_tracking_uri"],
        res["_experiment_id"],
        res["_study_run_id"],
        f"  (compare: filter tags.hkd.study = '{res['study']}')",
    )


def print_table(res: dict, where: str) -> None:
    """The tail of `hkd edit` / `hkd compare`: the markdown table, where the figures are, the MLflow run."""
    print(res["markdown"])
    print(where)
    if res.get("_tracking_uri"):
        print_ui(res["_tracking_uri"], res["_experiment_id"], res["_run_id"])


def print_config_options(opts: dict) -> None:
    """``hkd config``: every group with its options (the default marked) and what each is, then the presets."""
    print(
        "config groups (choose with group=option; every key can also be set alone, e.g. train.total_kimg=20):\n"
    )
    for group, g in opts["groups"].items():
        if group == "experiment":
            continue
        print(f"{group}:")
        for name, about in g["options"].items():
            mark = "*" if name == g["default"] else " "
            print(f"  {mark} {name:<14} {about}")
    print("\nexperiment presets (experiment=<name>, applied on top of the groups; none by default):")
    for name, about in opts["presets"].items():
        print(f"    {name:<16} {about}")
    print("\nthe resolved config of any command: hkd <command> [overrides] --dry-run")
