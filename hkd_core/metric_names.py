"""Every metric name the project logs, in one place (DESIGN 2: hierarchical names, `/`-separated).

Code that logs or reads a metric takes its name from here, so a rename is one edit and a typo is an
AttributeError instead of an empty chart in the MLflow UI. Steps count images seen (1 kimg = 1000 steps).
"""

from __future__ import annotations


# training loop (hkd_core.train): train/<loss term> for every term a loss returns (loss, loss_recon, loss_tcons,
# loss_latent with train.latent_weight > 0, loss_adv, lambda1, grad_norm), plus these
def train(term: str) -> str:
    return f"train/{term}"


TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_HOLDOUT_MSE = "train/holdout_mse"  # the EMA model vs the teacher on held-out trajectories
TRAIN_FIT_MSE = "train/train_mse"  # ... and on as many training trajectories (overfitting check)
TRAIN_KIMG = "train/kimg"
TRAIN_S = "train/train_s"
TRAIN_SKIPPED_NONFINITE = "train/skipped_nonfinite"  # steps skipped for a NaN/inf loss (train.skip_nonfinite)
TRAIN_ATTEMPT = "train/attempt"  # starts of the worker group, restarts included
TRAIN_RESUMED_FROM_KIMG = "train/resumed_from_kimg"
TRAIN_NODES = "train/nodes"  # Ray nodes the worker group runs on, at each start
SAMPLES_PER_S = "perf/samples_per_s"

# checkpoints and data (the Ray Train loops)
CHECKPOINT_KIMG = "checkpoint/kimg"
CHECKPOINT_UPLOAD_S = "checkpoint/upload_s"
CHECKPOINT_UPLOAD_RETRIES = "checkpoint/upload_retries"
SKIPPED_SHARDS = "data/skipped_shards"
# the sum of the trajectory seeds rank 0 trained on since the previous log point: two runs with the same values
# saw the same trajectories in the same windows (a resumed run continues the uninterrupted sequence)
DATA_SEED_SUM = "data/seed_sum"

# evaluation: the model at NFE 1, the teacher at eval.teacher_nfe, all with their N
EVAL_PREFIX = "eval/"
FID = "eval/fid"
KID = "eval/kid"
KID_STD = "eval/kid_std"
EVAL_N = "eval/n"
FID_NFE1 = "eval/fid_nfe1"
MSE_VS_TEACHER = "eval/mse_vs_teacher"
EVAL_S = "perf/eval_s"
NOISE_FLOOR_FID = "eval/noise_floor_fid"  # real training images against the reference, same N
CURVE = "curve"  # eval.curve_n: scored at every distill checkpoint
CURVE_FID = "curve/fid"
CURVE_KID = "curve/kid"
CURVE_KID_STD = "curve/kid_std"
TEACHER_FID_PREFIX = "eval/teacher_fid_nfe"


def teacher_fid(nfe: int) -> str:
    return f"{TEACHER_FID_PREFIX}{nfe}"


def teacher_kid(nfe: int) -> str:
    return f"eval/teacher_kid_nfe{nfe}"


def teacher_kid_std(nfe: int) -> str:
    return f"eval/teacher_kid_std_nfe{nfe}"


NOISE_FLOOR_KID = "eval/noise_floor_kid"
KID_RATIO = "eval/kid_ratio"  # KID(model, NFE 1) / KID(teacher, its full NFE): the headline
FID_RATIO = "eval/fid_ratio"  # the same for FID (squeezed towards 1 by the floor at small N)


def teacher_nfe_of(name: str) -> int | None:
    """The NFE of a ``teacher_fid`` name, None for any other metric."""
    return int(name.removeprefix(TEACHER_FID_PREFIX)) if name.startswith(TEACHER_FID_PREFIX) else None


# spectra (hkd_core.spectra.summarize): spectra/l<level>/<stat>
SPECTRA = "spectra"
SPECTRA_CANONICAL = (
    "spectra_canonical"  # the same summaries in the canonical gauge (hkd_core.gauge), to compare runs
)
SPECTRUM_STATS = (
    "alpha_mean",
    "alpha_min",
    "alpha_max",
    "alpha_std",
    "abs_beta_mean",
    "frac_growing",
    "num_modes",
)


def spectrum(level: int, stat: str, prefix: str = SPECTRA) -> str:
    return f"{prefix}/l{level}/{stat}"


# stage and job wall-clock
WALL_S = "perf/wall_s"
STAGE_TRAIN_S = "perf/train_s"
TRAJECTORIES_PER_S = "perf/trajectories_per_s"
PIPELINE_WALL_S = "perf/pipeline_wall_s"
STUDY_WALL_S = "perf/study_wall_s"

# sweeps and studies
SWEEP_TRIALS = "sweep/trials"
SWEEP_STOPPED_EARLY = "sweep/stopped_early"
SWEEP_COMPLETED = "sweep/completed"


def sweep_best(metric: str) -> str:
    return f"sweep/best_{metric.split('/')[-1]}"


def study(variant: str, what: str) -> str:
    return f"study/{variant}/{what}"


def band_share(kind: str, band: int | None, ring: str) -> str:
    """Band masking with a number: the share of spatial-frequency ring ``ring`` (low/mid/high) in what removing
    band ``band`` changes (kind 'band'), in the same for its random control ('random'), or in the samples ('image')."""
    return f"bands/{kind}/{ring}" if band is None else f"bands/{kind}{band}/{ring}"


def compare(model: int, level: int, stat: str) -> str:
    """``hkd compare``: model i's (0 = the reference row) alpha statistic or distance to model 0, per level."""
    return f"compare/model{model}/l{level}/{stat}"


def edit(what: str) -> str:
    return f"edit/{what}"
