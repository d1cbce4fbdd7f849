"""The teacher stage adopts a shipped teacher trained with exactly its config, without training; a corrupt one
stops the command (exit 3) naming the file. No service: storage=fs tracking=file, Ray in this process."""

import io
import json

import pytest
import torch

from hkd_core.shipped import write_shipped
from hkd_core.teachers import teacher_denoiser
from orchestrator import identity
from orchestrator.cli import main
from orchestrator.config import load

TINY = [
    "model=tiny",
    "teacher=edm",
    "teacher.channels=8",
    "teacher.channel_mult=[1,2]",
    "teacher.blocks=1",
    "teacher.attn_resolutions=[]",
    "teacher.total_kimg=1",
    "data.limit=64",
]


@pytest.fixture
def fs(tmp_path, monkeypatch):
    import ray

    for var in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HKD_SHIPPED_TEACHERS", str(tmp_path / "shipped"))
    if ray.is_initialized():
        ray.shutdown()
    yield [
        "storage=fs",
        "tracking=file",
        "cluster.address=null",
        f"storage.root={tmp_path}/store",
        f"tracking.root={tmp_path}/mlflow",
    ]
    ray.shutdown()


def _ship(tmp_path, over):
    pc = load(TINY + over)
    torch.manual_seed(3)
    net = teacher_denoiser(pc.run.teacher, 1, pc.run.data.resolution)
    write_shipped(tmp_path / "shipped" / "tiny-edm", pc.run.data, pc.run.teacher, net.state_dict(), kimg=7.0)
    return pc, net


@pytest.mark.slow
def test_a_matching_shipped_teacher_is_adopted_not_trained(fs, tmp_path, capsys):
    pc, net = _ship(tmp_path, fs)
    out = tmp_path / "res.json"
    assert main(["teacher", *TINY, *fs, "--no-progress", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["teacher"]
    assert res["adopted"] == str(tmp_path / "shipped" / "tiny-edm") and res["kimg"] == 7.0
    stored = torch.load(
        io.BytesIO((tmp_path / "store" / "runs" / res["teacher_key"]).read_bytes()), weights_only=True
    )
    assert all(
        torch.equal(stored[k], v) for k, v in net.state_dict().items()
    )  # the shipped weights, as they are
    assert not (tmp_path / "store" / "runs" / "ray").exists()  # Ray Train never ran
    assert res["teacher_key"].startswith(identity.stage_prefix(pc, "teacher"))


@pytest.mark.slow
def test_a_corrupt_shipped_teacher_stops_the_stage_naming_it(fs, tmp_path, capsys):
    _ship(tmp_path, fs)
    w = tmp_path / "shipped" / "tiny-edm" / "teacher.pt"
    w.write_bytes(w.read_bytes()[:-100])
    assert main(["teacher", *TINY, *fs, "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert f"shipped teacher {w} has sha256" in err and "altered or truncated" in err


def test_recorded_scores_are_reused_only_under_the_same_reference_weights_and_seeds(fs, tmp_path, caplog):
    """The evaluate stage takes the shipped teacher's own FID/KID instead of sampling it again, but only where
    the record measured it exactly as this evaluation would: the same N, seeds and split, and the same reference
    identity (the reference images' sha256 and the Inception weights' sha256). An evaluation recorded without an
    identity (the old single "eval") is never reused."""
    from orchestrator.stages.evaluation import identity_of, recorded_teacher_scores

    pc = load(TINY + fs + ["eval.n=64"])
    ident = identity_of(pc)
    assert ident["n"] == 64 and len(ident["inception_sha256"]) == 64 and ident["seed"] == pc.run.eval.seed
    net = teacher_denoiser(pc.run.teacher, 1, pc.run.data.resolution)
    ev = {
        "n": 64,
        "seed": pc.run.eval.seed,
        "split": "test",
        "by_nfe": {"35": {"fid": 40.0, "kid": 0.01}},
        "noise_floor_train_vs_test": {"fid": 20.0},
    }
    folder = tmp_path / "shipped" / "tiny-edm"
    write_shipped(folder, pc.run.data, pc.run.teacher, net.state_dict(), eval=ev)  # no identity: not reused
    assert recorded_teacher_scores(pc) == ({}, None)
    write_shipped(folder, pc.run.data, pc.run.teacher, net.state_dict(), evals=[{**ev, "reference": ident}])
    scores, floor = recorded_teacher_scores(pc)
    assert scores == {35: {"fid": 40.0, "kid": 0.01}} and floor == {"fid": 20.0}
    for other in (["eval.n=65"], ["eval.seed=7"], ["eval.split=train"], ["teacher.lr=0.5"]):
        assert recorded_teacher_scores(load(TINY + fs + ["eval.n=64"] + other)) == ({}, None), other
    # measured with other Inception weights, or against other reference images: refused, and the log says why
    for key, value in (("inception_sha256", "0" * 64), ("images_sha256", "f" * 64)):
        write_shipped(
            folder,
            pc.run.data,
            pc.run.teacher,
            net.state_dict(),
            evals=[{**ev, "reference": {**ident, key: value}}],
        )
        caplog.clear()
        assert recorded_teacher_scores(pc) == ({}, None), key
        assert f"({key} differ)" in caplog.text


def test_teacher_scores_are_cached_under_their_identity(fs, tmp_path):
    """cached_scores: computed once, then read back under the same identity; another identity computes again."""
    from orchestrator.stages.evaluation import cached_scores

    pc = load(TINY + fs + ["eval.n=64"])
    calls = []

    def compute():
        calls.append(1)
        return {"fid": 10.0 + len(calls), "kid": 0.1, "kid_std": 0.01}

    ident = {"n": 64, "images_sha256": "a", "inception_sha256": "b", "seed": 1, "teacher_sha256": "c"}
    assert cached_scores(pc, ident, "nfe35", compute)["fid"] == 11.0
    assert cached_scores(pc, ident, "nfe35", compute)["fid"] == 11.0 and len(calls) == 1
    assert cached_scores(pc, {**ident, "teacher_sha256": "d"}, "nfe35", compute)["fid"] == 12.0
    assert cached_scores(pc, {**ident, "inception_sha256": "e"}, "nfe35", compute)["fid"] == 13.0
    assert cached_scores(pc, ident, "nfe4", compute)["fid"] == 14.0 and len(calls) == 4


@pytest.mark.slow
def test_teacher_checkpoint_is_used_by_the_stage_instead_of_training(fs, tmp_path, capsys):
    """teacher.checkpoint (a training checkpoint with its EMA under 'ema', or a bare state dict) becomes the teacher
    stage's output as it is, with no training; its content is part of the stage's identity; a file written for
    another architecture stops the command (exit 3) naming it and the teacher.* keys; a missing one is a config
    error (exit 2) before anything runs."""
    from hkd_core.config import stage_hashes

    pc = load(TINY + fs)
    torch.manual_seed(5)
    net = teacher_denoiser(pc.run.teacher, 1, pc.run.data.resolution)
    ckpt = tmp_path / "teacher-ckpt.pt"
    torch.save({"ema": net.state_dict(), "nimg": 3000, "step": 47}, ckpt)
    out = tmp_path / "res.json"
    over = [*TINY, *fs, f"teacher.checkpoint={ckpt}"]
    assert main(["teacher", *over, "--no-progress", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["teacher"]
    assert res["from_checkpoint"] == str(ckpt) and res["kimg"] == 3.0 and res["adopted"] is None
    stored = torch.load(
        io.BytesIO((tmp_path / "store" / "runs" / res["teacher_key"]).read_bytes()), weights_only=True
    )
    assert stored.keys() == net.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in net.state_dict().items())
    assert not (tmp_path / "store" / "runs" / "ray").exists()  # Ray Train never ran

    h = stage_hashes(load(over).run)["teacher"]
    torch.save(net.state_dict(), ckpt)  # other bytes at the same path
    assert stage_hashes(load(over).run)["teacher"] != h

    wide = load(TINY + ["teacher.channels=16", "model.init=none"]).run.teacher
    torch.save(teacher_denoiser(wide, 1, pc.run.data.resolution).state_dict(), ckpt)
    assert main(["teacher", *over, "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert f"teacher.checkpoint {ckpt} was written for a different architecture" in err
    assert "teacher.channels, channel_mult, blocks and attn_resolutions must describe the network" in err

    missing = tmp_path / "nope.pt"
    assert main(["teacher", *TINY, *fs, f"teacher.checkpoint={missing}", "--no-progress"]) == 2
    assert f"teacher.checkpoint={missing} is not a file" in capsys.readouterr().err


@pytest.mark.slow
def test_ship_teacher_scores_once_and_an_interrupted_shipping_resumes_from_its_cached_scores(
    fs, tmp_path, monkeypatch
):
    """`hkd ship-teacher` writes the record with its scores per NFE and the floor; each score is cached as soon as it
    is measured, so shipping the same weights again (after an interruption, or into another folder) measures
    nothing and writes the same scores; other weights are measured afresh."""
    from orchestrator.stages import evaluation

    torch.manual_seed(5)
    pc = load(TINY + fs)
    net = teacher_denoiser(pc.run.teacher, 1, pc.run.data.resolution)
    ckpt = tmp_path / "teacher-ckpt.pt"
    torch.save({"ema": net.state_dict(), "nimg": 3000, "step": 47}, ckpt)
    over = [
        *TINY,
        *fs,
        f"teacher.checkpoint={ckpt}",
        "eval.n=32",
        "eval.kid_subset_size=16",
        "eval.teacher_nfe=[2]",
    ]
    assert main(["teacher", *over, "--no-progress"]) == 0
    assert main(["ship-teacher", *over, "--out", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "record.json").read_text())
    (ev,) = first["evals"]
    assert ev["n"] == 32 and set(ev["by_nfe"]) == {"2"} and ev["by_nfe"]["2"]["fid"] > 0
    assert ev["noise_floor_train_vs_test"]["fid"] > 0 and first["kimg"] == 3.0

    def refuse(*a, **k):
        raise AssertionError("measured again although its score is cached")

    with monkeypatch.context() as m:
        m.setattr(evaluation, "sample_scores", refuse)
        m.setattr(evaluation, "noise_floor", refuse)
        assert main(["ship-teacher", *over, "--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "record.json").read_text())["evals"][0]
    assert (
        again["by_nfe"] == ev["by_nfe"]
        and again["noise_floor_train_vs_test"] == ev["noise_floor_train_vs_test"]
    )

    # the teacher's scores are cached under its weights' sha256 (other weights: another key), the floor under the
    # reference alone (it is the data's, not the teacher's)
    import hashlib

    cached = {
        p.name.split("-n32-")[0]: json.loads(p.read_text())["reference"]
        for p in (tmp_path / "store").rglob("teacher-scores/**/*.json")
    }
    assert set(cached) == {"nfe2", "floor"}
    teacher_pt = next((tmp_path / "store").rglob("teacher-*/teacher.pt")).read_bytes()
    assert cached["nfe2"]["teacher_sha256"] == hashlib.sha256(teacher_pt).hexdigest()
    assert "teacher_sha256" not in cached["floor"] and cached["floor"]["n"] == 32

    # scored at another NFE later, into the same folder: NFE 2 and the floor are kept from the record (the floor
    # not measured again, even with its cached score gone), NFE 1 added, and the grid drawn at the fullest NFE
    for p in (tmp_path / "store").rglob("teacher-scores/**/floor-*.json"):
        p.unlink()
    with monkeypatch.context() as m:
        m.setattr(evaluation, "noise_floor", refuse)
        more = [*over[:-1], "eval.teacher_nfe=[1]"]
        assert main(["ship-teacher", *more, "--out", str(tmp_path / "a")]) == 0
    record = json.loads((tmp_path / "a" / "record.json").read_text())
    (both,) = record["evals"]
    assert both["by_nfe"]["2"] == ev["by_nfe"]["2"] and set(both["by_nfe"]) == {"1", "2"}
    assert (
        both["kept"][0]["nfe"] == ["2"]
        and both["noise_floor_train_vs_test"] == ev["noise_floor_train_vs_test"]
    )
    assert both["samples"].endswith("at NFE 2") and record["kimg"] == first["kimg"]
