"""Recipe choices at equal wall-clock: train one-step students on the same stored teacher trajectories, each for
the same number of seconds in one process, and score each with FID/KID at N = 1000 (the evaluation's own noise
seeds and test reference). Every row is a set of Hydra overrides, composed exactly as ``hkd pipeline`` composes
them (the default config: ``teacher=edm``, the shipped Fashion-MNIST teacher, whose weights initialise the
student under ``model.init``), so a row names the keys a user would set.

    python benchmarks/recipe_screen.py --trajectories TRAJ --seconds 600 \\
        --row "s1: train.states_per_traj=1" --row "kd: model.variant=kd train.states_per_traj=1" \\
        [--kimg K] [--n 1000] [--jsonl out.jsonl] [--grids DIR]

``--kimg`` also caps each row at K thousand images (a row stops at whichever comes first), so that rows can be
compared at equal images too; a row that sets ``train.total_kimg=K`` itself trains to that (equal compute across
rows of different cost: K in proportion to each row's measured rate); ``--n 0`` skips the evaluation and
reports the training rate alone (images/s, rows
side by side in one process: the ratio is what to read, these machines are noisy).

TRAJ is a trajectory stage's training split: ``s3://<bucket>/<prefix>/trajectories-<hash>/train`` (endpoint and
credentials from the environment, as ``eval "$(python infra/local/stack.py env)"`` sets them), a local folder
holding its manifest and shards, or a ``.pt`` file with ``states`` and ``sigmas``. Rows run one after the other
with all the threads (``--threads``); the training seconds are the budget, the number of images seen is what a
row could afford in them. Noise: the KID std (100 subsets) is printed with every row; the train-vs-test floor at
N = 1000 is in the shipped teacher's record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from hkd_core import evaluation as E
from hkd_core.fid import FeatureStats, InceptionFeatures, Reference
from hkd_core.figures import plot_rows, save_image_grid
from hkd_core.models import build_model, count_parameters
from hkd_core.shipped import find_shipped
from hkd_core.teacher_init import init_from_teacher
from hkd_core.train import train_hkd


def load_trajectories(where: str) -> tuple[torch.Tensor, torch.Tensor]:
    from hkd_core.trajectories import LocalStore, load_all

    if where.endswith(".pt"):
        d = torch.load(where, weights_only=True)
        return d["states"], d["sigmas"]
    if where.startswith("s3://"):
        from orchestrator.services.storage import StorageConfig, store_at

        return load_all(store_at(StorageConfig(), where[len("s3://") :]))
    return load_all(LocalStore(where))


def parse_row(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise SystemExit(f"--row {text!r}: write it as 'NAME: key=value key=value ...'")
    return name.strip(), rest.split()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trajectories", required=True)
    p.add_argument("--row", action="append", required=True, help="'NAME: hydra overrides' (repeatable)")
    p.add_argument("--seconds", type=float, default=600.0, help="training seconds per row")
    p.add_argument("--kimg", type=float, default=1e9, help="also stop each row at this many kimg")
    p.add_argument("--n", type=int, default=1000, help="FID/KID samples; 0: training rate only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jsonl", help="append one JSON line per row")
    p.add_argument("--grids", help="folder for each row's 8x8 sample grid (PNG)")
    p.add_argument(
        "--save",
        help="folder for each row's EMA model record (NAME.pt, hkd_core.models.model_record): "
        "for hkd compare and the spectra",
    )
    p.add_argument(
        "--figure",
        help="one PNG: each row's first 10 samples (the same noise in each column), labelled with its FID",
    )
    a = p.parse_args()
    from orchestrator.config import load

    rows = [parse_row(r) for r in a.row]
    names = [name for name, _ in rows]
    if len(set(names)) != len(names):
        raise SystemExit(f"--row names must differ: {names}")
    configs = {name: load(over).run for name, over in rows}  # every row validated before any work
    torch.set_num_threads(a.threads)
    states, sigmas = load_trajectories(a.trajectories)
    print(f"{states.shape[0]} trajectories of {states.shape[1]} states from {a.trajectories}", flush=True)
    first = next(iter(configs.values()))
    e = dataclasses.replace(first.eval, n=max(a.n, 2))
    if a.n:
        feats = InceptionFeatures(e.inception_weights, batch_size=e.batch_size)
        ref_feats = feats(E.reference_images(first.data, e.split, a.n))
        ref = Reference({}, FeatureStats.of(ref_feats), ref_feats)
        seeds = E.eval_seeds(e)
    shape = E.image_shape(first.data)
    shown, labels = [], []
    for name, over in rows:
        run = configs[name]
        torch.manual_seed(run.train.seed)
        model = build_model(run.model.variant, run.hkd_config())
        copied = []
        if run.model.init != "none":
            shipped = find_shipped(run.data, run.teacher)
            if shipped is None:
                raise SystemExit(
                    f"row {name}: model.init={run.model.init} needs the shipped teacher of this config"
                )
            copied = init_from_teacher(
                model, shipped.load(shape[0]), run.model.init, str(shipped.weights_path)
            )
        model = model.to(memory_format=torch.channels_last)
        train = dataclasses.asdict(run.train)
        # a row that names train.total_kimg trains to it (capped by --kimg); the others to --kimg / --seconds
        own = any(o.startswith("train.total_kimg=") for o in over)
        train.update(
            total_kimg=min(a.kimg, run.train.total_kimg) if own else a.kimg,
            max_train_s=a.seconds,
            log_every_kimg=1e9,
            checkpoint_every_kimg=1e9,
        )
        t0 = time.perf_counter()
        out = train_hkd(model, states.float(), sigmas.float(), progress=False, **train)
        train_s = time.perf_counter() - t0
        ema = out["ema"].eval()
        if a.save:
            from hkd_core.models import model_record

            Path(a.save).mkdir(parents=True, exist_ok=True)
            torch.save(model_record(ema), Path(a.save) / f"{name}.pt")
        if not a.n:
            res = {
                "row": name,
                "overrides": over,
                "params": count_parameters(model),
                "kimg": out["kimg"],
                "train_s": round(train_s, 1),
                "img_per_s": round(out["kimg"] * 1000 / train_s, 1),
            }
            print(
                f"{name:>24}: {res['img_per_s']:6.1f} images/s ({out['kimg']:.1f} kimg in {train_s:.0f} s, "
                f"{res['params']:,} params)",
                flush=True,
            )
            if a.jsonl:
                with open(a.jsonl, "a") as fh:
                    fh.write(json.dumps(res) + "\n")
            continue
        t1 = time.perf_counter()
        with torch.no_grad():
            imgs = torch.cat(
                [
                    ema.sample(x_T=E.noise(seeds[i : i + e.batch_size], shape)).clamp(-1, 1)
                    for i in range(0, len(seeds), e.batch_size)
                ]
            )
        f = feats(imgs)
        s = E.score(FeatureStats.of(f), f, ref, e.kid_subset_size)
        res = {
            "row": name,
            "overrides": over,
            "variant": run.model.variant,
            "init": run.model.init,
            "init_tensors": len(copied),
            "params": count_parameters(model),
            "kimg": out["kimg"],
            "steps": out["steps"],
            "train_s": round(train_s, 1),
            "eval_s": round(time.perf_counter() - t1, 1),
            "n": a.n,
            "trajectories": int(states.shape[0]),
            **s,
        }
        print(
            f"{name:>24}: FID {s['fid']:7.2f}  KID x1e3 {s['kid'] * 1e3:6.1f} +- {s['kid_std'] * 1e3:.1f}  "
            f"{out['kimg']:.1f} kimg in {train_s:.0f} s  ({res['params']:,} params)",
            flush=True,
        )
        if a.jsonl:
            with open(a.jsonl, "a") as fh:
                fh.write(json.dumps(res) + "\n")
        if a.grids:
            Path(a.grids).mkdir(parents=True, exist_ok=True)
            save_image_grid(imgs[:64], Path(a.grids) / f"{name}.png")
        shown.append(imgs[:10])
        labels.append(f"{name}\nFID {s['fid']:.1f}")
    if a.figure and shown:
        plot_rows(
            torch.stack(shown),
            a.figure,
            labels,
            title=f"one step (NFE 1), {a.seconds:.0f} s of training each; FID@{a.n}",
        )


if __name__ == "__main__":
    main()
