"""hkd_core.provenance: what a run records of the compute it ran on."""

import io

import torch

from hkd_core import provenance as P


def test_the_cpu_model_comes_from_cpuinfo_and_falls_back_to_the_platform(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: Fake EPYC 9999 64-Core\nflags : avx2\n"
    )
    monkeypatch.setattr(P, "Path", lambda p: info)
    assert P.cpu_model() == "Fake EPYC 9999 64-Core"
    monkeypatch.setattr(P, "Path", lambda p: tmp_path / "absent")
    monkeypatch.setattr(P.platform, "processor", lambda: "")
    monkeypatch.setattr(P.platform, "machine", lambda: "aarch64")
    assert P.cpu_model() == "aarch64"


def test_a_fingerprint_names_the_kernels_torch_dispatches_to():
    fp = P.fingerprint("cpu")
    assert fp["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert fp["torch"] == torch.__version__ and fp["threads"] == torch.get_num_threads()
    assert "accelerator" not in fp
    # checkpoints carry it and are read with weights_only (teacher.resume_from): plain types only
    buf = io.BytesIO()
    torch.save({"compute": [{"from_kimg": 0.0, "workers": P.gather()}]}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["compute"][0]["workers"] == [{**fp, "ranks": [0]}]


def test_ranks_on_the_same_compute_are_one_group(monkeypatch):
    a = {"cpu": "A", "cpu_capability": "AVX2", "torch": "2.14.1", "threads": 1}
    b = {**a, "cpu": "B", "cpu_capability": "AVX512"}
    assert P._groups([a, a, b, a]) == [{**a, "ranks": [0, 1, 3]}, {**b, "ranks": [2]}]
    # outside a process group: this process alone, as rank 0
    monkeypatch.setattr(P, "fingerprint", lambda device=None: dict(b))
    assert P.gather() == [{**b, "ranks": [0]}]


def test_the_summary_says_where_each_segment_trained():
    amd = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "torch": "2.14.1", "threads": 1, "ranks": [0, 1]}
    intel = {**amd, "cpu": "Intel Xeon", "cpu_capability": "AVX512", "threads": 2}
    gpu = {**amd, "accelerator": "NVIDIA H200", "ranks": [0]}
    one = [{"from_kimg": 0.0, "workers": [amd]}]
    assert P.summary(one) == "AMD EPYC (AVX2) x2, torch 2.14.1, 1 thread each"
    # a resume on the same compute is still one line; on another, both with where each began
    assert P.summary(one + [{"from_kimg": 5.0, "workers": [amd]}]) == P.summary(one)
    assert P.summary(one + [{"from_kimg": 5.0, "workers": [intel]}]) == (
        "AMD EPYC (AVX2) x2, torch 2.14.1, 1 thread each (from 0 kimg) then "
        "Intel Xeon (AVX512) x2, torch 2.14.1, 2 threads each (from 5 kimg)"
    )
    assert P.summary([{"from_kimg": 0.0, "workers": [gpu]}]).startswith("NVIDIA H200 x1")
    assert P.summary(None) == "" and P.summary([]) == ""
