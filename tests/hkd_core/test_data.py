import shutil

import numpy as np
import pytest
import torch

from hkd_core.data import DATASETS, SHA256, DataError, find_data_file, load_images, to_uint8


def _have(name):
    try:
        return find_data_file(name) is not None
    except DataError:
        return False


def _have_fashion():
    """Fashion-MNIST as the npz (shared/data, $HKD_DATA_DIR) or as Debian's dataset-fashion-mnist package."""
    import hkd_core.data as data

    return _have("fashion_mnist") or data._DEBIAN_FASHION.is_dir()


NO_FASHION = (
    "no Fashion-MNIST: neither fashion_mnist.npz (shared/data, $HKD_DATA_DIR) nor dataset-fashion-mnist"
)


@pytest.mark.skipif(not _have_fashion(), reason=NO_FASHION)
def test_fashion_mnist_padded_to_32():
    x, y = load_images("fashion_mnist", "test", resolution=32, limit=100)
    assert x.shape == (100, 1, 32, 32) and y.shape == (100,)
    assert x.min() >= -1 and x.max() <= 1 and x.max() > 0.9
    assert torch.all(x[:, :, :2, :] == -1) and torch.all(x[:, :, :, -2:] == -1)  # the padding is black
    x28, _ = load_images("fashion_mnist", "test", limit=100)
    assert torch.equal(x28, x[:, :, 2:30, 2:30])
    assert torch.equal(to_uint8(x28), torch.as_tensor(np.round((x28.numpy() + 1) * 127.5)).to(torch.uint8))


def test_corrupt_file_names_path_and_checksum(tmp_path, monkeypatch):
    """A corrupted copy of whichever data file this machine has (an npz, else Debian's IDX files) is refused,
    naming the file and both checksums."""
    import hkd_core.data as data

    name = next((n for n in ("mnist", "fashion_mnist") if _have(n)), None)
    if name is not None:
        bad = tmp_path / DATASETS[name].file
        shutil.copy(find_data_file(name), bad)
        with open(bad, "r+b") as f:
            f.seek(1000)
            f.write(b"\x00\x01\x02")
        with pytest.raises(DataError, match=rf"{bad}: sha256 is [0-9a-f]+, expected {SHA256[bad.name][:8]}"):
            load_images(name, root=tmp_path)
        return
    if not data._DEBIAN_FASHION.is_dir():
        pytest.skip(NO_FASHION)
    copy = tmp_path / "fashion-mnist"
    shutil.copytree(data._DEBIAN_FASHION, copy)
    import gzip

    target = copy / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(target.read_bytes()))
    raw[100] ^= 0xFF
    target.write_bytes(gzip.compress(bytes(raw)))
    monkeypatch.setattr(data, "_DEBIAN_FASHION", copy)
    monkeypatch.setattr(data, "default_search_dirs", lambda root=None: [])
    with pytest.raises(
        DataError, match=rf"{target}: md5 of its decompressed content is [0-9a-f]+, expected "
    ):
        load_images("fashion_mnist", "test", allow_download=False)


def test_missing_data_set_says_where_it_looked(tmp_path, monkeypatch):
    import hkd_core.data as data

    monkeypatch.setattr(data, "default_search_dirs", lambda root=None: [tmp_path])
    with pytest.raises(DataError, match=rf"not found. Looked for {tmp_path}/cifar10_jpeg_files.tar.gz"):
        load_images("cifar10_jpeg")
    with pytest.raises(DataError, match="unknown data set 'svhn'"):
        load_images("svhn")


def test_bad_resolution_is_refused():
    name = "mnist" if _have("mnist") else "fashion_mnist"
    if name == "fashion_mnist" and not _have_fashion():
        pytest.skip(NO_FASHION)
    with pytest.raises(DataError, match="resolution=31"):
        load_images(name, limit=4, resolution=31)


@pytest.mark.slow
def test_cifar10_jpeg_decodes_once_and_keeps_labels():
    if not _have("cifar10_jpeg"):
        pytest.skip("cifar10_jpeg_files.tar.gz not present")
    x, y = load_images("cifar10_jpeg", "test")
    assert x.shape == (10000, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))  # 1000 per class
    from hkd_core.data import cache_dir

    assert len(list(cache_dir().glob("cifar10_jpeg_*.npz"))) == 1  # decoded once, cached
    x2, _ = load_images("cifar10_jpeg", "test", limit=5, seed=3)
    assert x2.shape == (5, 3, 32, 32)


@pytest.mark.skipif(
    not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_debian_fashion_mnist_is_found_and_checked(monkeypatch):
    import hkd_core.data as data

    monkeypatch.setattr(data, "default_search_dirs", lambda root=None: [])
    x, y = load_images("fashion_mnist", "test", limit=50, seed=0)
    assert x.shape == (50, 1, 28, 28) and int(y.max()) <= 9
    if _have("fashion_mnist"):
        monkeypatch.undo()
        x2, y2 = load_images("fashion_mnist", "test", limit=50, seed=0)
        assert torch.equal(x, x2) and torch.equal(y, y2)  # the same images as the npz
