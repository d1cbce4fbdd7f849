"""`hkd edit --reference`: where a reference image comes from, and the errors for the ways it can be wrong (no
services: a tiny model and the local data)."""

import numpy as np
import pytest
import torch
from PIL import Image

from hkd_core.data import load_images
from hkd_core.models import build_model
from orchestrator.analysis.editing import EditArgs, load_references
from orchestrator.config import compose, from_composed


@pytest.fixture(scope="module")
def pc():
    return from_composed(compose(["experiment=smoke"]))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("hkd", "tiny").eval()


def test_data_references_are_the_test_images_named(pc, model):
    test, _ = load_images("fashion_mnist", "test", resolution=32)
    refs, labels = load_references(pc, EditArgs(reference="data:5,9"), model, 3)
    torch.testing.assert_close(refs, test[[5, 9, 5]])
    assert labels == ["fashion_mnist test #5", "fashion_mnist test #9", "fashion_mnist test #5"]
    a, la = load_references(pc, EditArgs(reference="data", seed=1), model, 2)
    b, lb = load_references(pc, EditArgs(reference="data", seed=2), model, 2)
    assert la != lb and a.shape == (2, 1, 32, 32)


def test_file_and_sample_references(pc, model, tmp_path):
    img = np.zeros((28, 28, 3), np.uint8)
    img[:, 14:] = 255  # right half white
    Image.fromarray(img).save(tmp_path / "half.png")
    refs, labels = load_references(pc, EditArgs(reference=f"file:{tmp_path / 'half.png'}"), model, 2)
    assert refs.shape == (2, 1, 32, 32) and labels == ["half.png", "half.png"]
    assert refs[0, 0, :, :12].max() < -0.9 and refs[0, 0, :, 20:].min() > 0.9  # gray, resized, in [-1, 1]
    s, ls = load_references(pc, EditArgs(reference="sample"), model, 2)
    with torch.no_grad():
        torch.testing.assert_close(s, model.sample(2, torch.Generator().manual_seed(1)).clamp(-1, 1))
    assert ls == ["sample 0", "sample 1"]


def test_bad_references_are_named(pc, model, tmp_path):
    with pytest.raises(ValueError, match="--reference 'imagenet:3'"):
        EditArgs(reference="imagenet:3").validate()
    with pytest.raises(ValueError, match="give the image path"):
        EditArgs(reference="file:").validate()
    with pytest.raises(ValueError, match="--controls 0"):
        EditArgs(controls=0).validate()
    with pytest.raises(ValueError, match=r"indices \[10000\] outside the test split's 0..9999"):
        load_references(pc, EditArgs(reference="data:1,10000"), model, 2)
    with pytest.raises(ValueError, match="indices must be integers"):
        load_references(pc, EditArgs(reference="data:one"), model, 2)
    with pytest.raises(FileNotFoundError, match="nothere.png: no such file"):
        load_references(pc, EditArgs(reference=f"file:{tmp_path / 'nothere.png'}"), model, 2)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not an image PIL can read"):
        load_references(pc, EditArgs(reference=f"file:{tmp_path / 'junk.png'}"), model, 2)
