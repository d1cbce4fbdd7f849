"""``hkd study``: its flags and what it runs: the whole study, the merge of a study's parts, or one study at
several seeds put into one table."""

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
    p.add_argument(
        "--seeds",
        nargs="+",
        metavar="DIR",
        help="one study run at several train.seed values (one whole or merged study folder per seed) into one "
        "table in --out: each seed's KID and FID, their mean and spread over seeds; runs nothing",
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
    if args.merge and args.seeds:
        raise api.UsageError("hkd study: give --merge (the parts of one seed) or --seeds, not both", "study")
    if args.seeds:
        if not args.out:
            raise api.UsageError(
                "hkd study --seeds needs --out: the folder for the table over seeds", "study"
            )
        res = api.study_combine(args.seeds, args.out, over_seeds=True)
        out.write_json(args.json, res)
        print(res["markdown"])
        print(f"table and figure: {res['folder']}/seeds.md, seeds.png, seeds.json")
        return 0
    if args.merge:
        if not args.out:
            raise api.UsageError("hkd study --merge needs --out: the folder for the merged table", "study")
        res = api.study_combine(args.merge, args.out)
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
