"""Bad input is refused before any work, with a message that names the key and what to do. The table of
cases is also the documentation: docs/bad_inputs.md is generated from it (`python tests/orchestrator/test_bad_inputs.py
> docs/bad_inputs.md`) and a test keeps the two equal."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# fmt: off
# (what is wrong, Hydra overrides of `hkd pipeline`, the exact message)
CONFIGS = [
    ('odd subspace dimension', ['model.levels=2', 'model.subspace_dims=[8,15]'],
     'model.subspace_dims[1] (level 2) is 15; each d_l must be even and >= 2 (it holds d_l/2 '
     'complex-conjugate eigenvalue pairs)'),
    ('len(d_l) != L', ['model.levels=2', 'model.subspace_dims=[8,16,16]'],
     'model.subspace_dims has 3 entries [8, 16, 16] but model.levels is 2; give one d_l per level'),
    ('levels without dims', ['model.levels=7'],
     "model.levels=7 differs from preset 'small' (3 levels); give model.subspace_dims too (one even d_l per level)"),
    ('more levels than the resolution allows', ['data.resolution=30'],
     'model.levels=3 needs resolution divisible by 2^2; resolution 30 allows at most 2 levels'),
    ('unknown data set (group)', ['data=imagenet'],
     "In 'config': Could not find 'data/imagenet' ; available options in 'data': cifar10_jpeg fashion_mnist mnist"),
    ('unknown data set (key)', ['data.name=svhn'],
     "data.name='svhn' is not allowed; choose one of ['cifar10_jpeg', 'fashion_mnist', 'mnist']"),
    ('unknown key (typo)', ['train.lerning_rate=0.1'],
     'unknown key train.lerning_rate: it is not in the composed config (a typo? `hkd pipeline --dry-run` '
     'prints every key)'),
    ('wrong type', ['train.lr=fast'],
     "train.lr='fast' must be of type float"),
    ('teacher.resume_from without a U-Net teacher', ['teacher=empirical', 'model.init=none',
                                                     'teacher.resume_from=/tmp/ckpt.pt'],
     "teacher.resume_from is set but teacher.kind is 'empirical'; only a trained U-Net teacher (teacher=edm) has "
     "training to continue: use teacher=edm, or unset teacher.resume_from"),
    ('teacher.resume_from and teacher.checkpoint together', ['teacher.resume_from=s3://hkd/a/ckpt-1.pt',
                                                            'teacher.checkpoint=s3://hkd/b/teacher.pt'],
     "teacher.resume_from and teacher.checkpoint are both set: teacher.checkpoint adopts finished weights (no "
     "training), teacher.resume_from continues training; unset one of them"),
    ('a word for data.limit other than auto', ['data.limit=all'],
     "data.limit='all': give a number of images, null (all of them) or auto (all for teacher=edm, 5000 for "
     "teacher=empirical)"),
    ('teacher-feature distance without a U-Net teacher', ['teacher=empirical', 'model.init=none',
                                                          'train.perceptual=teacher'],
     "train.perceptual=teacher measures images in a U-Net teacher's features; teacher.kind is 'empirical', which has "
     "no network: use teacher=edm (it adopts a shipped teacher where one matches), or train.perceptual=pseudo_huber"),
    ('teacher-feature discriminator without a U-Net teacher', ['teacher=empirical', 'model.init=none',
                                                               'train.adversarial_weight=0.1',
                                                               'train.adversarial_disc=teacher'],
     "train.adversarial_disc=teacher puts the discriminator on a U-Net teacher's features; teacher.kind is "
     "'empirical', which has no network: use teacher=edm, or train.adversarial_disc=small"),
    ('unknown discriminator', ['train.adversarial_disc=vgg'],
     "train.adversarial_disc='vgg' is not allowed; choose one of ['small', 'teacher']"),
    ('unknown lr schedule', ['train.lr_schedule=linear'],
     "train.lr_schedule='linear' is not allowed; choose one of ['constant', 'cosine']"),
    ('grown blocks on KD', ['model.variant=kd', 'model.grow_blocks=1'],
     'model.grow_blocks=1 adds blocks to the HKD/KDM decoder; model.variant=kd is the teacher\'s U-Net itself: use '
     'model.grow_blocks=0 (or null)'),
    ('negative budget', ['train.total_kimg=-1'],
     'train.total_kimg=-1.0 must be > 0'),
    ('zero batch', ['train.batch_size=0'],
     'train.batch_size=0 must be > 0'),
    ('unknown operator', ['model.operator=diagonal'],
     "model.operator is 'diagonal'; allowed: ['position', 'shared', 'none'] (or one per level)"),
    ('unknown decoder', ['model.decoder=conv'],
     "model.decoder is 'conv'; allowed: ['light', 'unet']"),
    ('negative alpha bound', ['model.alpha_bound=-1'],
     'model.alpha_bound is -1.0; it must be > 0 (the largest |alpha|) or 0 (unbounded)'),
    ('latent term on a model without Koopman latents', ['model.variant=kd', 'train.latent_weight=0.1'],
     'train.latent_weight=0.1 needs per-level Koopman latents (model.variant hkd, no_koopman or one_level); '
     'model.variant=kd has none: use train.latent_weight=0'),
    ('more levels than the teacher it starts from', ['model.levels=6', 'model.subspace_dims=[8,8,8,8,8,8]'],
     "model.levels=6 with model.init=teacher: the student starts from the teacher's U-Net, which has only 3 levels "
     "(teacher.channel_mult=[1, 2, 2]); use model.levels <= 3 or model.init=none (random weights)"),
    ('unknown variant', ['model.variant=gan'],
     "model.variant='gan' is not allowed; choose one of ['hkd', 'kd', 'kdm', 'no_koopman', 'one_level']"),
    ('unknown sampler', ['trajectories.sampler=rk4'],
     "trajectories.sampler='rk4' is not allowed; choose one of ['euler', 'heun']"),
    ('too few steps for s', ['train.states_per_traj=4', 'trajectories.steps=1'],
     'train.states_per_traj=4 needs 3 intermediate states, but trajectories.steps=1 gives 0'),
    ('teacher init, student wider than the teacher', ['model.channels=16'],
     'model.init=teacher: student tensor encoder.embed.mlp.0.weight (64, 16) needs net.embed.mlp.0.weight from '
     'the teacher (teacher.*), which is shape (128, 32); the student\'s trunk must match the teacher\'s '
     '(model.channels, '
     'model.channel_mult, model.blocks and attention equal to teacher.channels, channel_mult, blocks, '
     'attn_resolutions), or use model.init=none'),
    ('teacher init without a U-Net teacher', ['teacher=empirical', 'model.init=teacher'],
     "model.init=teacher needs a U-Net teacher (teacher=edm); teacher.kind is 'empirical', which has no weights to "
     "start from; use model.init=none"),
    ('x_T weight out of range', ['train.xT_weight=1.5'],
     'train.xT_weight=1.5 must be in (0, 1], or null for the paper\'s plain sum over the states'),
    ('consistency states above every sigma', ['train.states_per_traj=4', 'train.tcons_sigma_min=100'],
     'train.states_per_traj=4 needs 3 intermediate states, but trajectories.steps=18 gives 0 with sigma >= '
     'train.tcons_sigma_min=100.0'),
    ('teacher checkpoint not a file', ['teacher.checkpoint=/nonexistent/teacher.pt'],
     'teacher.checkpoint=/nonexistent/teacher.pt is not a file; give a local teacher.pt (or a training checkpoint) '
     'or an s3://bucket/key URI'),
    ('teacher checkpoint for the empirical teacher', ['teacher=empirical', 'model.init=none',
                                                      'teacher.checkpoint=/nonexistent/teacher.pt'],
     "teacher.checkpoint is set but teacher.kind is 'empirical'; a checkpoint holds a U-Net teacher's weights: use "
     "teacher=edm, or unset teacher.checkpoint"),
    ('LPIPS without its weights', ['train.perceptual=lpips'],
     'train.perceptual=lpips needs local weight files (nothing is downloaded): set train.lpips_vgg_path '
     '(torchvision\'s vgg16 state dict) and train.lpips_lin_path (the LPIPS linear heads); train.lpips_vgg_path is '
     'not set. Or use train.perceptual=pseudo_huber, which needs none'),
    ('LPIPS weights missing on disk', ['train.perceptual=lpips', 'train.lpips_vgg_path=/nonexistent/vgg16.pth',
                                       'train.lpips_lin_path=/nonexistent/lin.pth'],
     'train.lpips_vgg_path=/nonexistent/vgg16.pth is not a file; LPIPS needs its weights on local disk (the same '
     'path on every node), or use train.perceptual=pseudo_huber'),
    ('FID with one sample', ['eval.n=1'],
     'eval.n=1: FID needs at least 2 samples (a covariance); use a few hundred or more'),
    ('bad teacher NFE', ['eval.teacher_nfe=[0]'],
     'eval.teacher_nfe[0]=0 must be > 0'),
    ('no workers', ['cluster.num_workers=0'],
     'cluster.num_workers=0 must be >= 1'),
    ('batch not divisible by workers', ['cluster.num_workers=3'],
     'train.batch_size=32 is not divisible by cluster.num_workers=3'),
    ('unknown placement strategy', ['cluster.placement_strategy=spread'],
     "cluster.placement_strategy='spread'; choose one of ['PACK', 'SPREAD', 'STRICT_SPREAD']"),
    ('GPU without GPUs', ['cluster.use_gpu=true', 'cluster.gpus_per_worker=0'],
     'cluster.use_gpu is true but cluster.gpus_per_worker is 0; give each worker a GPU'),
    ('missing bucket setting', ['storage.bucket='],
     'storage.bucket is empty; name the S3 bucket (or set HKD_S3_BUCKET)'),
    ('endpoint not a URL', ['storage.endpoint_url=ftp://x'],
     "storage.endpoint_url='ftp://x' must start with http:// or https://"),
    ('unknown data source', ['storage.data_source=nfs'],
     "storage.data_source='nfs' is not allowed; choose auto (the local disk, else s3://<bucket>/datasets/), local "
     "or s3"),
    ('missing tracking URI', ['tracking.uri='],
     "tracking.uri is empty; set it (or MLFLOW_TRACKING_URI) to the MLflow server's URL"),
    ('tracking URI not MLflow', ['tracking.uri=mysql://db'],
     "tracking.uri='mysql://db' is not an MLflow tracking URI (http://host:port, sqlite:///...)"),
    ('empty experiment name', ['tracking.experiment='],
     'tracking.experiment is empty; name the MLflow experiment the runs go to (default hkd)'),
]

# (what is wrong, the sweep YAML, the exact message)
SWEEPS = [
    ('unknown key',
     'name: x\nbase: [experiment=smoke]\nspace: {train.lr: {uniform: [0.1, 0.2]}}\nschedulr: {}\n',
     "<sweep>: schedulr: unknown key; allowed: ['name', 'base', 'space', 'metric', 'mode', 'trials', "
     "'max_concurrency', 'scheduler', 'report', 'resources', 'study_storage', 'seed', 'description']"),
    ('empty space',
     'name: x\nbase: [experiment=smoke]\nspace: {}\n',
     '<sweep>: space: is empty: give at least one key to search'),
    ('empty range',
     'name: x\nbase: [experiment=smoke]\nspace: {train.lr: {uniform: [0.3, 0.1]}}\n',
     '<sweep>: space.train.lr: uniform range [0.3, 0.1] is empty: lo must be < hi'),
    ('log range through 0',
     'name: x\nbase: [experiment=smoke]\nspace: {train.lr: {loguniform: [0, 0.1]}}\n',
     '<sweep>: space.train.lr: loguniform needs lo > 0, got 0'),
    ('odd dims in the space',
     'name: x\nbase: [experiment=smoke]\nspace: {model.subspace_dims: {per_level: {values: [4, 5]}}}\n',
     '<sweep>: space.model.subspace_dims.per_level: subspace dimensions must be even integers >= 2, got [4, 5]'),
    ('levels without per-level dims',
     'name: x\nbase: [experiment=smoke]\nspace: {model.levels: {values: [1, 2]}}\n',
     '<sweep>: space.model.levels: searching the number of levels needs model.subspace_dims with per_level, '
     'so that d_l follows L'),
    ('metric never reported',
     'name: x\nbase: [experiment=smoke]\nspace: {train.lr: {uniform: [0.1, 0.2]}}\nmetric: eval/acc\n',
     "<sweep>: metric: 'eval/acc' is not reported per trial; choose one of ['eval/fid', 'eval/kid', "
     "'eval/mse_vs_teacher']"),
    ('key not in the config',
     'name: x\nbase: [experiment=smoke]\nspace: {train.lerning_rate: {uniform: [0.1, 0.2]}}\n',
     '<sweep>: space.train.lerning_rate: is not a key of the composed base config'),
    ('trials not a number',
     'name: x\nbase: [experiment=smoke]\nspace: {train.lr: {uniform: [0.1, 0.2]}}\ntrials: many\n',
     "<sweep>: trials: must be an integer >= 1, got 'many'"),
]
# fmt: on


@pytest.mark.parametrize("what, overrides, message", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bad_config_gives_its_exact_message(what, overrides, message):
    from hkd_core.config import ConfigError
    from orchestrator.config import compose, from_composed

    with pytest.raises(ConfigError) as e:
        from_composed(compose(overrides))
    assert str(e.value) == message


@pytest.mark.parametrize("what, text, message", SWEEPS, ids=[c[0] for c in SWEEPS])
def test_bad_sweep_gives_its_exact_message(what, text, message):
    from orchestrator.config import compose
    from orchestrator.sweep.spec import SweepError, check_against_config, parse

    with pytest.raises(SweepError) as e:
        check_against_config(parse(text), compose)
    assert str(e.value) == message


def test_cli_prints_the_message_and_exits_2_before_ray_starts():
    import subprocess

    what, overrides, message = CONFIGS[0]
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator", "pipeline", *overrides],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().endswith(f"hkd: config error: {message}")
    assert "ray" not in r.stderr.lower().replace("array", "")


def services() -> list[tuple[str, str]]:
    """The gate's messages for each service failure, made by the code that makes them (preflight.classify and
    tracking_server_check) with placeholders for the endpoint, bucket, file and URL: the doc cannot drift from
    the code (a changed message makes docs/bad_inputs.md stale), and tests/integration/test_gate.py checks the
    same messages against the real servers."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    from orchestrator.services.preflight import MissingBucket, classify, tracking_server_check
    from orchestrator.services.raycheck import ray_check, ray_token_refused
    from orchestrator.services.storage import StorageConfig

    cfg = StorageConfig(endpoint_url="<endpoint>", bucket="<bucket>", credentials_file="<file>")
    denied = ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadBucket")
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens, refused at once
    tracking = tracking_server_check(dead, 2.0)["detail"].replace(dead, "<uri>")
    return [
        ("nothing listens at the S3 endpoint", classify(EndpointConnectionError(endpoint_url="x"), cfg)),
        ("wrong access key or secret", classify(denied, cfg)),
        ("the bucket does not exist (a typo)", classify(MissingBucket("NoSuchBucket: <bucket>"), cfg)),
        ("nothing listens at the MLflow URL", tracking),
        (
            "nothing listens at the Ray address",
            _refusal(ray_check, "127.0.0.1:9").replace("127.0.0.1:9", "<address>"),
        ),
        ("a wrong Ray token", ray_token_refused("<address>", "<file>", "token")),
    ]


def _refusal(fn, *args) -> str:
    from orchestrator.services.storage import StorageError

    try:
        fn(*args)
    except StorageError as e:
        return str(e)
    raise AssertionError(f"{fn.__name__}{args} did not refuse")


def timings() -> list[str]:
    """The whole command's time to fail, from benchmarks/time_to_fail.py's committed measurement."""
    import json

    f = ROOT / "docs" / "results" / "benchmarks" / "time_to_fail.json"
    if not f.is_file():
        return []
    m = json.loads(f.read_text())
    out = [
        f"Time to fail, the whole `hkd pipeline experiment=smoke` process from start to exit "
        f"(`benchmarks/time_to_fail.py`, {m['rounds']} alternating rounds, median; {m['machine']}):",
        "",
        "| case | exit code | seconds | of which the gate and the message (above the floor) |",
        "|---|---:|---:|---:|",
    ]
    out += [
        f"| {r['case']} | {r['exit']} | {r['median_s']:.2f} | {r['over_floor_s']:+.2f} |" for r in m["rows"]
    ]
    return out


def markdown() -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = [
        "# Bad input and what it says",
        "",
        "Every case below is refused before Ray starts or anything is written, with exactly this message",
        "(`hkd` prints it after `hkd: config error:` or `hkd: sweep error:` and exits with 2). The table is",
        "generated from `tests/orchestrator/test_bad_inputs.py`, which checks every message.",
        "",
        "## Configs (`hkd pipeline <overrides>`)",
        "",
        "| what is wrong | overrides | message |",
        "|---|---|---|",
    ]
    lines += [f"| {w} | `{' '.join(o)}` | {cell(m)} |" for w, o, m in CONFIGS]
    lines += [
        "",
        "## Sweep YAMLs (`hkd sweep <file>`)",
        "",
        "`<sweep>` stands for the file's path.",
        "",
        "| what is wrong | YAML | message |",
        "|---|---|---|",
    ]
    lines += [f"| {w} | `{cell(t.strip())}` | {cell(m)} |" for w, t, m in SWEEPS]
    lines += [
        "",
        "## Unreachable or misconfigured services (every command, before its work)",
        "",
        "Every command that touches S3 or MLflow (`pipeline`, the stage commands, `sweep`, `study`, `edit`,",
        "`compare`, `data push`, `ship-teacher`) first runs preflight's cheap part: one HEAD of the bucket "
        "and one call to",
        "the tracking server and, for the commands that run Ray work, one call to the Ray head "
        "(cluster.address, or the",
        "job's head under `ray job submit`) with the driver's token, in about a second. A failure prints",
        "`hkd: storage error: <message>` (or `hkd: sweep error:` etc.), exits with 2, and nothing is written to S3",
        "or MLflow; no stage starts (and for S3 and MLflow failures Ray is not even imported).",
        "`hkd preflight` prints the same messages for its full write/read/list probes. Checked against the",
        "real servers by `tests/integration/test_gate.py` and `test_storage_and_preflight.py`.",
        "",
        "| what is wrong | message |",
        "|---|---|",
    ]
    lines += [f"| {w} | `{cell(m)}` |" for w, m in services()]
    t = timings()
    lines += ["", *t, ""] if t else [""]
    lines += [
        "The storage root (`s3://<bucket>/<prefix>`) is part of every run's key (`hkd.run_key`): the same",
        "config against another bucket is another MLflow run, never a reopened one.",
        "",
    ]
    return "\n".join(lines)


def test_docs_show_exactly_these_cases():
    assert (ROOT / "docs" / "bad_inputs.md").read_text() == markdown(), (
        "docs/bad_inputs.md is stale: python tests/orchestrator/test_bad_inputs.py > docs/bad_inputs.md"
    )


if __name__ == "__main__":
    sys.stdout.write(markdown())
