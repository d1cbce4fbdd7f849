"""Where a number was computed: the CPU's model, the kernel set PyTorch chose for it, the accelerator, PyTorch's
version and threads.

A training run on the CPU is deterministic on one kind of CPU: the same config gives the same weights to the last
bit, idle or contended. On another kind it need not. PyTorch and MKL pick their kernels by the instruction set
they find (AVX2, AVX-512, and MKL takes other paths on AMD than on Intel), and the kernels sum in different
orders. A difference in the last bit of one step then grows over a thousand steps into another model, as close
to the first as another seed is. So every training run records this, beside its config hash and commit, and a
number that differs from another run's can be told apart from a regression.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
import torch.distributed as dist


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 7B13", "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"), from
    /proc/cpuinfo where there is one, else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def fingerprint(device: torch.device | str | None = None) -> dict:
    """This process's compute: the CPU's model, the CPU kernel set PyTorch dispatches to ("AVX2", "AVX512",
    "DEFAULT"), PyTorch's version and intra-op threads, and, for a CUDA device, the GPU's name and CUDA's
    version."""
    out = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": str(torch.__version__),  # a plain str: checkpoints load with weights_only
        "threads": torch.get_num_threads(),
    }
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        out["accelerator"] = torch.cuda.get_device_name(dev)
        out["cuda"] = str(torch.version.cuda)
    return out


def gather(device: torch.device | str | None = None) -> list[dict]:
    """Every rank's fingerprint, each distinct one once with the ranks that have it (a collective: every rank
    calls it). Outside a process group: this process alone, as rank 0."""
    mine = fingerprint(device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    else:
        every = [mine]
    return _groups(every)


def _groups(every: list[dict]) -> list[dict]:
    """Rank-ordered fingerprints as distinct groups, each with its ranks, in order of first appearance."""
    groups: list[dict] = []
    for rank, fp in enumerate(every):
        same = next((g for g in groups if {k: v for k, v in g.items() if k != "ranks"} == fp), None)
        if same is None:
            groups.append({**fp, "ranks": [rank]})
        else:
            same["ranks"].append(rank)
    return groups


def summary(segments: list[dict] | None) -> str:
    """One line for a run's record of segments (``[{"from_kimg": ..., "workers": gather()}, ...]``), e.g.
    "AMD EPYC (AVX2) x2, torch 2.14.1, 1 thread each"; segments on different compute are joined by " then "."""
    parts = []
    for seg in segments or []:
        words = []
        for g in seg.get("workers", []):
            where = g.get("accelerator") or f"{g['cpu']} ({g['cpu_capability']})"
            n = len(g.get("ranks", [])) or 1
            threads = g.get("threads")
            words.append(
                f"{where} x{n}, torch {g['torch']}"
                + (f", {threads} thread{'s' if threads != 1 else ''} each" if threads else "")
            )
        line = "; ".join(words)
        if line and (not parts or parts[-1][1] != line):
            parts.append((seg.get("from_kimg", 0.0), line))
    if len(parts) <= 1:
        return parts[0][1] if parts else ""
    return " then ".join(f"{line} (from {k:g} kimg)" for k, line in parts)
