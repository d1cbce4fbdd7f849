"""Shipped teachers: adopted only for exactly their config, refused (naming the file) when altered or foreign."""

import dataclasses
import json

import pytest
import torch

from hkd_core.config import DataConfig, RunConfig, TeacherConfig, stage_hashes
from hkd_core.shipped import ShippedTeacherError, find_shipped, read_shipped, teacher_hash, write_shipped
from hkd_core.teachers import teacher_denoiser

DATA = DataConfig(limit=None)
TEACHER = TeacherConfig(
    kind="edm", channels=8, channel_mult=[1, 2], blocks=1, attn_resolutions=[], sigma_data=0.66
)


@pytest.fixture
def shipped(tmp_path):
    torch.manual_seed(0)
    net = teacher_denoiser(TEACHER, 1, DATA.resolution)
    return write_shipped(
        tmp_path / "fmnist-edm",
        DATA,
        TEACHER,
        net.state_dict(),
        kimg=12.5,
        fid={"n": 1000, "nfe": 35, "fid": 40.0},
    ), net


def test_the_record_is_found_for_its_config_only(shipped, tmp_path):
    s, net = shipped
    assert s.hash == stage_hashes(RunConfig(data=DATA, teacher=TEACHER))["teacher"]  # the stage's identity
    assert find_shipped(DATA, TEACHER, [tmp_path]).folder == s.folder
    assert find_shipped(DATA, dataclasses.replace(TEACHER, lr=2e-3), [tmp_path]) is None
    assert find_shipped(dataclasses.replace(DATA, limit=5000), TEACHER, [tmp_path]) is None
    rec = json.loads((s.folder / "record.json").read_text())
    assert rec["teacher_hash"] == teacher_hash(DATA, TEACHER) and rec["kimg"] == 12.5
    state = s.load(img_channels=1)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_keys_added_to_the_schema_later_take_their_defaults(shipped):
    s, _ = shipped
    rec = json.loads((s.folder / "record.json").read_text())
    del rec["config"]["teacher"]["ema_rampup"]  # a record written before the key existed
    (s.folder / "record.json").write_text(json.dumps(rec))
    assert read_shipped(s.folder).hash == teacher_hash(DATA, TEACHER)


def test_altered_weights_are_refused_naming_the_file(shipped):
    s, _ = shipped
    data = bytearray(s.weights_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    s.weights_path.write_bytes(bytes(data))
    with pytest.raises(ShippedTeacherError, match=rf"{s.weights_path} has sha256 .* altered or truncated"):
        s.load(img_channels=1)


def test_weights_of_another_architecture_are_refused(shipped, tmp_path):
    s, _ = shipped
    other = teacher_denoiser(dataclasses.replace(TEACHER, channels=16), 1, DATA.resolution)
    forged = write_shipped(tmp_path / "forged", DATA, TEACHER, other.state_dict())  # a record that lies
    with pytest.raises(ShippedTeacherError, match=r"forged/teacher.pt.*does not describe these weights"):
        forged.load(img_channels=1)


def test_a_corrupt_record_is_refused_naming_it(shipped, tmp_path):
    s, _ = shipped
    (s.folder / "record.json").write_text("{not json")
    with pytest.raises(ShippedTeacherError, match=r"fmnist-edm/record.json is unreadable"):
        find_shipped(DATA, TEACHER, [tmp_path])


def test_a_teacher_trained_in_segments_is_recorded_under_its_one_go_config(tmp_path):
    """The CIFAR teacher trains over several sessions (teacher.resume_from); a resumed run's weights equal an
    uninterrupted run's, so its record carries the config without resume_from (that config adopts it) and keeps
    the last segment's checkpoint as a fact."""
    torch.manual_seed(0)
    net = teacher_denoiser(TEACHER, 1, DATA.resolution)
    last = "s3://hkd/runs/ray/teacher-abc/checkpoint_x/ckpt-000340.032.pt"
    segmented = dataclasses.replace(TEACHER, resume_from=last)
    s = write_shipped(tmp_path / "cifar-edm", DATA, segmented, net.state_dict(), kimg=400.0)
    rec = json.loads((s.folder / "record.json").read_text())
    assert rec["config"]["teacher"]["resume_from"] is None and rec["resumed_from"] == last
    assert rec["teacher_hash"] == teacher_hash(DATA, TEACHER) != teacher_hash(DATA, segmented)
    assert find_shipped(DATA, TEACHER, [tmp_path]).folder == s.folder


def test_the_shipped_cifar_teacher_is_adopted_for_its_own_config_only_and_refused_when_altered(tmp_path):
    """hkd_core/shipped/cifar-edm (issue 27): found for the config it records, which carries no resume_from; any
    other teacher key, or weights whose sha256 differs from the record's, and it is not used."""
    import shutil

    from hkd_core.shipped import SHIPPED_DIR

    s = read_shipped(SHIPPED_DIR / "cifar-edm")
    assert s.data.name == "cifar10_jpeg" and s.teacher.resume_from is None and s.record["resumed_from"]
    assert find_shipped(s.data, s.teacher).folder == s.folder
    assert find_shipped(s.data, dataclasses.replace(s.teacher, max_train_s=9000.0)) is None
    assert find_shipped(s.data, dataclasses.replace(s.teacher, resume_from=s.record["resumed_from"])) is None
    state = s.load(img_channels=3)
    assert sum(v.numel() for v in state.values() if v.is_floating_point()) == s.record["params"]
    copy = tmp_path / "cifar-edm"
    shutil.copytree(s.folder, copy)
    raw = bytearray((copy / "teacher.pt").read_bytes())
    raw[-200] ^= 0xFF
    (copy / "teacher.pt").write_bytes(bytes(raw))
    with pytest.raises(ShippedTeacherError, match=str(copy / "teacher.pt")):
        read_shipped(copy).load(img_channels=3)
