"""What an evaluation ends with: its headline (the KID ratio first, the FID ratio, the floor at that N), as the
JSON the evaluate stage stores beside its run (``headline``) and as the lines ``hkd`` prints (``headline_lines``)."""

from __future__ import annotations

from hkd_core import metric_names as M
from hkd_core import provenance
from orchestrator import identity


def headline(pc, metrics: dict, distill: dict, pipeline_run_id: str | None, run_id: str) -> dict:
    """The evaluation's headline (hkd_core.evaluation.headline: the KID ratio first, the FID ratio, the floor at
    this N) with what makes it traceable: the pipeline and evaluate run ids, the config hash, the commit, and the
    training budget behind it."""
    from hkd_core.evaluation import headline as numbers

    e = pc.run.eval
    full = max(e.teacher_nfe) if e.teacher_nfe else 2 * pc.run.trajectories.steps - 1
    return {
        "name": pc.name,
        **numbers(metrics, full),
        "run_id": pipeline_run_id,
        "evaluate_run_id": run_id,
        "config_hash": identity.pipeline_hash(pc),
        "commit": identity.git_sha(),
        "kimg": distill.get("kimg"),
        "train_s": distill.get("train_s"),
        "model_uri": distill.get("model_uri"),
        # the distill stage's compute (hkd_core.provenance): a run on another kind of CPU trains another model,
        # as close as another seed; this says which
        "trained_on": provenance.summary(distill.get("compute")) or None,
    }


def headline_lines(m: dict) -> list[str]:
    """The evaluation as a reader should take it: the KID ratio first (KID is unbiased, so the ratio means the
    same at any N), then the FID ratio with the floor that squeezes it at this N, then the other teacher NFEs."""
    n = int(m[M.EVAL_N])
    nfes = sorted(x for x in (M.teacher_nfe_of(k) for k in m) if x is not None)
    kid = f"{m[M.KID] * 1e3:.1f} ± {m[M.KID_STD] * 1e3:.1f}"
    floor = (
        f"floor at N = {n}: {m[M.NOISE_FLOOR_FID]:.2f}, what real images score"
        if M.NOISE_FLOOR_FID in m
        else ""
    )
    if not nfes or M.teacher_kid(nfes[-1]) not in m:
        return [
            f"HKD at NFE 1, N = {n}: KID x1e3 {kid}   FID {m[M.FID]:.2f}" + (f"   ({floor})" if floor else "")
        ]
    full = nfes[-1]
    t_kid, t_fid = m[M.teacher_kid(full)], m[M.teacher_fid(full)]
    t_std = m.get(M.teacher_kid_std(full))
    lines = [
        f"HKD at NFE 1 against the teacher at NFE {full} (N = {n}, the same noise seeds):",
        (
            f"  KID ratio {m[M.KID] / t_kid:.2f}"
            if t_kid > (t_std or 0)
            else "  KID ratio n/a (the teacher's KID is within its std of 0 at this N: too few samples for a ratio)"
        )
        + f"   (KID x1e3 {kid} against {t_kid * 1e3:.1f}"
        + (f" ± {t_std * 1e3:.1f}" if t_std is not None else "")
        + ")",
        f"  FID ratio {m[M.FID] / t_fid:.2f}   (FID {m[M.FID]:.2f} against {t_fid:.2f}"
        + (f"; {floor})" if floor else ")"),
    ]
    for nfe in nfes[:-1]:
        lines.append(
            f"  teacher at NFE {nfe}: FID {m[M.teacher_fid(nfe)]:.2f}, KID x1e3 "
            f"{m.get(M.teacher_kid(nfe), float('nan')) * 1e3:.1f}"
        )
    return lines
