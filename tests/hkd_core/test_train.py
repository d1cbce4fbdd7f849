import json
import math

import pytest
import torch

from hkd_core.checkpoint import CheckpointError, latest_checkpoint
from hkd_core.edm import EDMPrecond, UNet, UNetConfig
from hkd_core.models import build_model
from hkd_core.train import train_hkd, train_teacher


def _fresh(tiny_cfg, variant="hkd"):
    torch.manual_seed(0)
    return build_model(variant, tiny_cfg)


@pytest.mark.slow
def test_distillation_reduces_the_loss(fast_kw, tiny_cfg, toy_trajectories):
    states, sigmas = toy_trajectories
    logged = []
    res = train_hkd(
        _fresh(tiny_cfg),
        states,
        sigmas,
        total_kimg=0.8,
        states_per_traj=3,
        metrics_cb=lambda m, k: logged.append(m),
        **fast_kw,
    )
    assert res["steps"] == 50 and res["kimg"] == pytest.approx(0.8)
    first, last = logged[0]["train/loss"], logged[-1]["train/loss"]
    assert last < 0.7 * first, (first, last)
    assert {"train/loss_recon", "train/loss_tcons", "train/lambda1", "perf/samples_per_s"} <= set(logged[-1])


class _Crash(Exception):
    pass


def _crash_at(kimg_stop: float):
    """A checkpoint callback that stops the run right after the checkpoint at ``kimg_stop`` is written."""

    def cb(path, metrics, kimg):
        if kimg >= kimg_stop - 1e-9:
            raise _Crash

    return cb


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_resume_continues_exactly_where_it_stopped(fast_kw, tiny_cfg, toy_trajectories, tmp_path, schedule):
    """A run that stops after a checkpoint and is started again with the same config ends with the weights of the
    run that went straight through, the learning-rate schedule included (the cosine's position is the images
    seen, not the process's own count)."""
    states, sigmas = toy_trajectories
    fast = {**fast_kw, "lr_schedule": schedule}
    straight = train_hkd(
        _fresh(tiny_cfg), states, sigmas, total_kimg=0.16, checkpoint_dir=tmp_path / "a", **fast
    )
    with pytest.raises(_Crash):
        train_hkd(
            _fresh(tiny_cfg),
            states,
            sigmas,
            total_kimg=0.16,
            checkpoint_dir=tmp_path / "b",
            checkpoint_cb=_crash_at(0.08),
            **fast,
        )
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["kimg"] == pytest.approx(0.08)
    resumed = train_hkd(
        _fresh(tiny_cfg), states, sigmas, total_kimg=0.16, checkpoint_dir=tmp_path / "b", **fast
    )
    assert resumed["steps"] == straight["steps"] == 10
    # where it trained (hkd_core.provenance): one segment straight through; resumed, a second from 0.08 kimg
    assert [[seg["from_kimg"] for seg in r["compute"]] for r in (straight, resumed)] == [[0.0], [0.0, 0.08]]
    for a, b in zip(straight["model"].state_dict().values(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight["ema"].state_dict().values(), resumed["ema"].state_dict().values()):
        assert torch.equal(a, b)
    # old checkpoints are pruned; the pointer names the newest
    assert latest_checkpoint(tmp_path / "b").name == "ckpt-000000.160.pt"
    assert len(list((tmp_path / "b").glob("ckpt-*.pt"))) == 2


def test_wall_clock_budget_stops_training(fast_kw, tiny_cfg, toy_trajectories, monkeypatch):
    """With no kimg limit only the budget can end a run: on a clock where every optimizer step takes 0.15 s it
    stops after exactly the step that crosses 1 s (the 7th), whatever the machine's speed."""
    import hkd_core.loop as T

    now = [0.0]

    class Clock:
        @staticmethod
        def perf_counter():
            now[0] += 0.15  # a step is timed by two consecutive reads: 0.15 s of training per step
            return now[0]

    monkeypatch.setattr(T, "time", Clock)
    states, sigmas = toy_trajectories
    res = train_hkd(_fresh(tiny_cfg), states, sigmas, total_kimg=float("inf"), max_train_s=1.0, **fast_kw)
    assert res["steps"] == 7 and res["train_s"] == pytest.approx(1.05)
    assert res["kimg"] == pytest.approx(res["steps"] * 0.016)


def test_resuming_with_another_architecture_is_refused(fast_kw, tiny_cfg, toy_trajectories, tmp_path):
    states, sigmas = toy_trajectories
    train_hkd(_fresh(tiny_cfg), states, sigmas, total_kimg=0.016, checkpoint_dir=tmp_path, **fast_kw)
    with pytest.raises(CheckpointError, match="different architecture"):
        train_hkd(
            _fresh(tiny_cfg, "kdm"), states, sigmas, total_kimg=0.032, checkpoint_dir=tmp_path, **fast_kw
        )


def test_batch_must_split_over_workers(fast_kw, tiny_cfg, toy_trajectories):
    states, sigmas = toy_trajectories
    with pytest.raises(ValueError, match="batch_size=16 is not divisible by the 3 workers"):
        train_hkd(_fresh(tiny_cfg), states, sigmas, world_size=3, **fast_kw)


@pytest.mark.slow
def test_teacher_training_learns_to_denoise(toy_images, tmp_path):
    torch.manual_seed(0)
    net = EDMPrecond(
        UNet(UNetConfig(resolution=8, channels=8, channel_mult=(1, 2), blocks=1, attn_resolutions=()))
    )
    logged = []
    res = train_teacher(
        net,
        toy_images,
        total_kimg=1.6,
        batch_size=32,
        lr=3e-3,
        lr_rampup_kimg=0,
        log_every_kimg=0.32,
        checkpoint_every_kimg=0.8,
        checkpoint_dir=tmp_path,
        progress=False,
        metrics_cb=lambda m, k: logged.append(m["train/loss"]),
    )
    assert logged[-1] < 0.7 * logged[0]
    assert latest_checkpoint(tmp_path) is not None and res["steps"] == 50


def test_generators_learn_at_their_own_rate(fast_kw, tiny_cfg, toy_trajectories):
    states, sigmas = toy_trajectories
    fast = train_hkd(_fresh(tiny_cfg), states, sigmas, total_kimg=0.08, koopman_lr_mult=10.0, **fast_kw)[
        "model"
    ]
    slow = train_hkd(_fresh(tiny_cfg), states, sigmas, total_kimg=0.08, koopman_lr_mult=1.0, **fast_kw)[
        "model"
    ]
    # Adam moves each parameter by about lr per step, so after 5 steps |alpha| is bounded by 5 * lr * mult
    a_fast = max(k.alpha.abs().max().item() for k in fast.koopman)
    a_slow = max(k.alpha.abs().max().item() for k in slow.koopman)
    assert a_slow <= 5 * 3e-3 * 1.01 < a_fast <= 5 * 3e-3 * 10 * 1.01


def test_eval_callback_runs_at_each_checkpoint_on_the_ema(fast_kw, tiny_cfg, toy_trajectories):
    states, sigmas = toy_trajectories
    seen, reported = [], []

    def eval_cb(ema, kimg):
        assert not ema.training and not any(p.requires_grad for p in ema.parameters())
        seen.append(kimg)
        return {"eval/proxy": 10 * kimg}

    train_hkd(
        _fresh(tiny_cfg),
        states,
        sigmas,
        total_kimg=0.048,
        eval_cb=eval_cb,
        checkpoint_cb=lambda path, m, kimg: reported.append(m),
        **fast_kw,
    )
    assert seen == pytest.approx([0.016, 0.032, 0.048])
    assert [m["eval/proxy"] for m in reported] == pytest.approx([0.16, 0.32, 0.48])


@pytest.mark.parametrize("budget", ["kimg", "seconds"])
def test_the_cosine_schedule_ramps_up_then_reaches_its_end_value(budget):
    """lr_factor: the ramp-up, then a cosine from 1 to lr_end_frac that ends where the run ends, whichever
    budget ends it; constant stays at 1 after the ramp-up."""
    import dataclasses

    from hkd_core.config import TrainConfig
    from hkd_core.train import lr_factor

    s = TrainConfig(total_kimg=40.0, lr_rampup_kimg=2.0, lr_schedule="cosine", lr_end_frac=0.05)
    if budget == "seconds":
        s = dataclasses.replace(s, total_kimg=float("inf"), max_train_s=100.0)
    at = (
        (lambda p: lr_factor(s, 40 * p, 0.0))
        if budget == "kimg"
        else (lambda p: lr_factor(s, 2 + 40 * p, 100 * p))
    )
    if budget == "kimg":
        assert lr_factor(s, 1.0) == pytest.approx(0.5 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi / 40))))
    assert at(1.0) == pytest.approx(0.05) and at(1.5) == pytest.approx(0.05)  # the end value, and it stays
    assert at(0.5) == pytest.approx(0.05 + 0.95 * 0.5)  # halfway: the midpoint
    values = [at(p / 20) for p in range(2, 21)]
    assert all(a > b for a, b in zip(values, values[1:]))
    const = dataclasses.replace(s, lr_schedule="constant")
    assert lr_factor(const, 1.0) == 0.5 and lr_factor(const, 30.0, 99.0) == 1.0


def test_the_teachers_tensors_learn_at_their_own_rate_and_the_last_lr_is_the_end_value(
    fast_kw, tiny_cfg, toy_trajectories
):
    """train.teacher_lr_mult scales the lr of the tensors named as copied from the teacher (and only those);
    the cosine schedule's last step runs at lr * lr_end_frac."""
    states, sigmas = toy_trajectories
    model = _fresh(tiny_cfg)
    copied = [n for n, _ in model.named_parameters() if n.startswith("encoder.conv_in")]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    lrs = []
    res = train_hkd(
        model,
        states,
        sigmas,
        total_kimg=0.08,
        teacher_tensors=copied,
        teacher_lr_mult=0.01,
        lr_schedule="cosine",
        lr_end_frac=0.1,
        metrics_cb=lambda m, k: lrs.append(m["train/lr"]),
        **fast_kw,
    )
    moved = {n: (p.detach() - start[n]).abs().max().item() for n, p in res["model"].named_parameters()}
    # Adam moves a parameter by at most about lr * mult per step: 5 steps
    assert max(moved[n] for n in copied) <= 5 * 3e-3 * 0.01 * 1.01
    assert moved["encoder.stages.0.res.0.conv0.weight"] > 5 * 3e-3 * 0.01 * 2
    assert lrs[-1] == pytest.approx(3e-3 * lr_factor_at_last_step(0.08, 0.016, 0.1))


def lr_factor_at_last_step(total_kimg, kimg_per_step, end):
    """The factor the last step ran with: its lr is set from the images seen before it."""
    p = (total_kimg - kimg_per_step) / total_kimg
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * p))


def test_the_held_out_and_training_errors_are_logged_as_curves(fast_kw, tiny_cfg, toy_trajectories):
    """holdout: the EMA model's MSE on the held-out and on as many training trajectories, at every
    holdout_every_kimg, beside the training loss; equal to holdout_error on the final EMA model."""
    from hkd_core.evaluation import holdout_error

    states, sigmas = toy_trajectories
    logged = []
    res = train_hkd(
        _fresh(tiny_cfg),
        states[4:],
        sigmas,
        total_kimg=0.064,
        holdout_every_kimg=0.032,
        holdout={"holdout": states[:4], "train": states[4:8]},
        metrics_cb=lambda m, k: logged.append((k, m)),
        **fast_kw,
    )
    with_holdout = [(k, m) for k, m in logged if "train/holdout_mse" in m]
    assert [k for k, _ in with_holdout] == pytest.approx([0.032, 0.064])
    assert all("train/train_mse" in m and "train/loss" in m for _, m in with_holdout)
    assert with_holdout[-1][1]["train/holdout_mse"] == pytest.approx(holdout_error(res["ema"], states[:4]))
    assert with_holdout[-1][1]["train/train_mse"] == pytest.approx(holdout_error(res["ema"], states[4:8]))


def _poisoned(states, steps: set[int], batch: int = 16):
    """The usual random batches, except that at each step in ``steps`` one trajectory is all NaN."""
    from hkd_core.train import TensorBatches

    get = TensorBatches(states, batch)

    def at(step: int) -> torch.Tensor:
        b = get(step).clone()
        if step in steps:
            b[0].fill_(float("nan"))
        return b

    return at


def test_a_nonfinite_loss_ends_the_run_naming_its_step_and_leaves_the_checkpoints_finite(
    fast_kw, tiny_cfg, toy_trajectories, tmp_path
):
    from hkd_core.checkpoint import load_checkpoint
    from hkd_core.train import NonFiniteLossError

    states, sigmas = toy_trajectories
    with pytest.raises(
        NonFiniteLossError,
        match=r"the loss is nan \(gradient norm nan\) at step 3 \(0.048 kimg\).*"
        r"train.skip_nonfinite=true",
    ):
        train_hkd(
            _fresh(tiny_cfg),
            _poisoned(states, {3}),
            sigmas,
            total_kimg=0.32,
            states_per_traj=3,
            checkpoint_dir=tmp_path,
            **fast_kw,
        )
    state = load_checkpoint(tmp_path)  # the checkpoint at 0.048 kimg, written before step 3
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if torch.is_floating_point(v))


def test_skip_nonfinite_skips_the_steps_counts_them_and_keeps_the_weights_finite(
    fast_kw, tiny_cfg, toy_trajectories
):
    states, sigmas = toy_trajectories
    logged = []
    res = train_hkd(
        _fresh(tiny_cfg),
        _poisoned(states, {2, 5}),
        sigmas,
        total_kimg=0.16,
        states_per_traj=3,
        skip_nonfinite=True,
        metrics_cb=lambda m, k: logged.append(m),
        **fast_kw,
    )
    assert res["skipped_nonfinite"] == 2 and res["steps"] == 10 and res["kimg"] == pytest.approx(0.16)
    assert all(torch.isfinite(p).all() for p in res["model"].parameters())
    assert all(torch.isfinite(p).all() for p in res["ema"].parameters())
    assert logged[-1]["train/skipped_nonfinite"] == 2 and math.isfinite(logged[-1]["train/loss"])
    assert "train/skipped_nonfinite" not in logged[0]  # step 0: nothing skipped yet


_BUDGET_RANK = """
import sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
import hkd_core.loop as T
from hkd_core.models import build_model
from hkd_core.train import train_hkd

rank, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
now = [0.0]


class Clock:  # rank 0 trains 0.15 s per step, rank 1 0.25 s: each would stop at another step by its own clock
    @staticmethod
    def perf_counter():
        now[0] += (0.15, 0.25)[rank]
        return now[0]


T.time = Clock
args = torch.load(out + "/args.pt", weights_only=False)  # written by the test itself
torch.manual_seed(0)
model = DistributedDataParallel(build_model("hkd", args["cfg"]))
res = train_hkd(model, args["states"], args["sigmas"], rank=rank, world_size=2, total_kimg=float("inf"),
                max_train_s=1.0, lr_schedule="cosine", **args["kw"])
torch.save({"steps": res["steps"], "train_s": res["train_s"], "model": res["model"].state_dict()},
           f"{out}/rank{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_wall_clock_budget_ends_every_rank_at_the_same_step(fast_kw, tiny_cfg, toy_trajectories, tmp_path):
    """Two data-parallel ranks (gloo on 127.0.0.1) whose clocks run at different speeds: with max_train_s they
    agree on the seconds trained (the slower rank's), so both stop after the same step (the 4th, 4 x 0.25 s) with
    equal weights; timed alone, rank 0 would train 7 steps and pair its gradient all-reduce with nothing."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    states, sigmas = toy_trajectories
    torch.save({"cfg": tiny_cfg, "states": states, "sigmas": sigmas, "kw": fast_kw}, tmp_path / "args.pt")
    script = tmp_path / "rank.py"
    script.write_text(_BUDGET_RANK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(port), str(tmp_path)],
            cwd=root,
            env={**__import__("os").environ, "PYTHONPATH": str(root)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 4 and r0["train_s"] == r1["train_s"] == pytest.approx(1.0)
    assert all(torch.equal(a, b) for a, b in zip(r0["model"].values(), r1["model"].values()))
