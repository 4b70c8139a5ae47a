"""Fashion-MNIST data module: committed test split, idx parsing errors, model-space images, captions."""

import gzip

import numpy as np
import pytest
import torch

from difa.data import FMNIST_CLASSES, INSTALL, TEST_ROOT, TRAIN_ROOT, captions, load_fmnist, read_idx, to_model_space
from difa.errors import DifaError


@pytest.fixture(scope="module")
def test_split():
    return load_fmnist("test")


def _idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, a.ndim]) + np.array(a.shape, ">u4").tobytes() + a.astype(np.uint8).tobytes()


def _one_line_error(path) -> str:
    with pytest.raises(DifaError) as e:
        read_idx(path)
    msg = str(e.value)
    assert msg and "\n" not in msg and str(path) in msg
    return msg


def test_committed_test_split_loads(test_split):
    x, y = test_split
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1 and x.max() == 1
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 1000))
    assert len(FMNIST_CLASSES) == 10 and FMNIST_CLASSES[0] == "T-shirt/top" and FMNIST_CLASSES[9] == "Ankle boot"


def test_read_idx_roundtrip_plain_and_gz(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(a))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(_idx_bytes(a)))
    assert np.array_equal(read_idx(tmp_path / "a.idx"), a)
    assert np.array_equal(read_idx(tmp_path / "a.idx.gz"), a)


def test_read_idx_corrupt_and_truncated(tmp_path):
    good = _idx_bytes(np.zeros((5, 28, 28), np.uint8))
    bad_magic = tmp_path / "magic.idx"
    bad_magic.write_bytes(b"\x12\x34" + good[2:])
    assert "magic" in _one_line_error(bad_magic)
    garbage_gz = tmp_path / "garbage.gz"
    garbage_gz.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 4)
    assert "gzip" in _one_line_error(garbage_gz)
    truncated = tmp_path / "trunc.idx"
    truncated.write_bytes(good[:-100])
    assert "expected" in _one_line_error(truncated)
    truncated_gz = tmp_path / "trunc.idx.gz"
    truncated_gz.write_bytes(gzip.compress(good)[:-50])
    _one_line_error(truncated_gz)
    real = (TEST_ROOT / "t10k-labels-idx1-ubyte.gz").read_bytes()
    truncated_real = tmp_path / "t10k-labels-truncated.gz"
    truncated_real.write_bytes(gzip.compress(gzip.decompress(real)[:5000]))
    assert "expected 10008" in _one_line_error(truncated_real)


def test_to_model_space_shape_range_and_recoverable(test_split):
    x = test_split[0][:64]  # (64, 1, 28, 28)
    m = to_model_space(x)
    assert m.shape == (64, 3, 32, 32) and m.dtype == torch.float32
    assert m.min() >= -1 and m.max() <= 1
    assert torch.all(m[:, :, :2] == -1) and torch.all(m[:, :, -2:] == -1)  # black padding rows
    assert torch.all(m[:, :, :, :2] == -1) and torch.all(m[:, :, :, -2:] == -1)  # black padding columns
    assert torch.equal(m[:, 0], m[:, 1]) and torch.equal(m[:, 0], m[:, 2])
    assert torch.allclose((m[:, :1, 2:30, 2:30] + 1) / 2, x, atol=1e-6)
    with pytest.raises(DifaError):
        to_model_space(torch.zeros(1, 3, 28, 28))


def test_captions_deterministic_and_named(test_split):
    y = test_split[1][:200]
    c0 = captions(y, seed=0)
    assert c0 == captions(y, seed=0) and c0 != captions(y, seed=1)
    assert len(c0) == 200 and all(FMNIST_CLASSES[int(k)] in c for k, c in zip(y, c0))
    assert len({c.replace(FMNIST_CLASSES[int(k)], "{}") for k, c in zip(y, c0)}) > 1  # several templates used
    assert captions([3, 8], templates=("{}!",)) == ["Dress!", "Bag!"]
    with pytest.raises(DifaError):
        captions([10])


def test_train_split_missing_names_install_command(tmp_path):
    with pytest.raises(DifaError) as e:
        load_fmnist("train", root=tmp_path)
    assert INSTALL in str(e.value) and "apt-get install dataset-fashion-mnist" in str(e.value)
    with pytest.raises(DifaError):
        load_fmnist("val")


def test_train_split_from_debian_package():
    if not (TRAIN_ROOT / "train-images-idx3-ubyte.gz").is_file():
        with pytest.raises(DifaError, match="apt-get install dataset-fashion-mnist"):
            load_fmnist("train")
        return
    x, y = load_fmnist("train")
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 6000))
