"""``hkd study``: its flags and what it runs, the whole study or the merge of a study's parts."""

from __future__ import annotations

import argparse
import json

from orchestrator import api
from orchestrator.cli import output as out


def add_study_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--variants",
        help="comma-separated subset of no_koopman_no_tcons,no_tcons,one_level,hkd (the "
        "paper's cumulative ablation rows), kd, kd_scratch, kdm, hkd_scratch",
    )
    p.add_argument(
        "--teacher-nfe",
        help="teacher NFEs to score (default 1,2,4 and the trajectories' full NFE; none: a part of a study "
        "whose teacher another part scores)",
    )
    p.add_argument("--out", help="local folder for the table and figures (default runs/study-<id>)")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="merge the parts of one study (the --out folders of `hkd study --variants ...` runs on the same "
        "overrides) into one table in --out; runs nothing",
    )


def _teacher_nfe(text: str | None) -> list[int] | None:
    """--teacher-nfe: None (the default NFEs), [] for 'none', else the comma-separated NFEs."""
    if text is None or not text.strip():
        return None
    if text.strip().lower() == "none":
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise api.UsageError(
            f"--teacher-nfe {text!r}: give comma-separated NFEs, e.g. 1,4,35, or none", "teacher-nfe"
        ) from None


def study_main(args) -> int:
    if args.merge:
        if not args.out:
            raise api.UsageError("hkd study --merge needs --out: the folder for the merged table", "study")
        res = api.study_merge(args.merge, args.out)
        out.write_json(args.json, res)
        print(res["markdown"])
        print(f"table and figures: {res['folder']}/study.md, study_fid.png")
        return 0
    nfe = _teacher_nfe(args.teacher_nfe)
    if args.dry_run:
        study, cfgs = api.study_plan(args.overrides, args.variants, nfe)
        print(
            json.dumps(
                {
                    "study": study,
                    "variants": {
                        v: {"config": pc.to_dict(), "plan": api.plan(pc, "evaluate")}
                        for v, (pc, _) in cfgs.items()
                    },
                },
                indent=1,
                default=str,
            )
        )
        return 0
    res = api.study(args.overrides, args.variants, nfe, args.out, progress=not args.no_progress)
    out.write_json(args.json, res)
    out.print_study(res)
    return 0
