import json

import pytest

from hkd_core.__main__ import main

TINY = ["--set", "model.preset=tiny", "--set", "trajectories.num=64", "--set", "trajectories.holdout=16",
        "--set", "trajectories.shard_size=32", "--set", "train.total_kimg=0.128", "--set", "train.batch_size=32",
        "--set", "data.limit=200", "--set", "eval.n=24", "--set", "eval.teacher_nfe=[1]", "--set", "eval.batch_size=24"]


def test_dry_run_prints_the_resolved_config(capsys, tmp_path):
    assert main(["run", "--out", str(tmp_path), "--dry-run", "--set", "model.levels=2",
                 "--set", "model.subspace_dims=[8,16]"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["config"]["model"]["subspace_dims"] == [8, 16] and set(d["stages"]) == {"teacher", "trajectories",
                                                                                    "distill", "evaluate"}
    assert not any(tmp_path.iterdir())     # nothing ran


@pytest.mark.parametrize("args, msg", [
    (["--set", "model.subspace_dims=[8,15,16]"], "subspace_dims[1] (level 2) is 15"),
    (["--set", "train.lrr=1"], "unknown key train.lrr"),
    (["--set", "levels"], "is not key=value"),
])
def test_bad_overrides_fail_fast_with_the_key(capsys, tmp_path, args, msg):
    assert main(["run", "--out", str(tmp_path)] + args) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.slow
def test_run_end_to_end_then_skip_finished_stages(capsys, tmp_path):
    assert main(["run", "--out", str(tmp_path), "--no-progress"] + TINY) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    ev = res["eval"]
    assert ev["eval/n"] == 24 and ev["eval/fid"] > 0 and "eval/teacher_fid_nfe1" in ev
    assert "eval/mse_vs_teacher" in ev and "spectra/l1/alpha_mean" in ev
    names = {p.split("/")[-1] for p in res["figures"]}
    assert names == {"samples.png", "spectrum.png", "alpha_maps.png", "band_masking.png", "trajectory.png",
                     "band_masking_levels.png", "band_trajectory.png", "band_energy.png"}
    model = next(tmp_path.glob("distill-*/model.pt"))
    shard = next(tmp_path.glob("trajectories-*/train/shard-000000.npz"))
    stamps = model.stat().st_mtime_ns, shard.stat().st_mtime_ns
    assert "FID@24 (NFE 1)" in capsys.readouterr().out
    # the same config again: trajectories and the model are reused, not rebuilt
    assert main(["run", "--out", str(tmp_path), "--no-progress"] + TINY) == 0
    assert (model.stat().st_mtime_ns, shard.stat().st_mtime_ns) == stamps
