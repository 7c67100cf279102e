"""The MetaPerturb paper's datasets: tiny fixtures in each official layout, imported with `mpbench data prepare
--from` (zip, tar, tgz, folder), decoded to RGB at the stored size, cached, verified; `held_out_per_class`."""
from __future__ import annotations

import hashlib
import os
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torchvision import transforms

import mpbench.data.jpeg as jpeg
from mpbench.data import (DATASETS, ImageData, clear_cache, first_per_class, held_out_per_class, load_dataset)
from mpbench.data.cifar import Cifar100
from mpbench.data.cub200 import CUB200
from mpbench.data.fgvc_aircraft import FGVCAircraft
from mpbench.data.jpeg import JpegListDataset
from mpbench.data.stanford_cars import StanfordCars
from mpbench.data.stanford_dogs import StanfordDogs
from mpbench.data.svhn import SVHN
from mpbench.data.tiny_imagenet import TinyImageNet
from mpbench.errors import DataMissingError, UsageError

PAPER = {"tiny_imagenet": TinyImageNet, "stanford_dogs": StanfordDogs, "stanford_cars": StanfordCars,
         "fgvc_aircraft": FGVCAircraft, "cub200": CUB200}
K = 3  # classes in every fixture


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


@pytest.fixture(autouse=True)
def _fixture_checksums(monkeypatch):
    """The fixtures carry the official file names but not the published bytes: no published md5 applies."""
    for cls in PAPER.values():
        monkeypatch.setattr(cls, "archive_md5", {})
        monkeypatch.setattr(cls, "md5", {})


# -- fixture writers ------------------------------------------------------------------------------------------------
def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Path:
    """A small JPEG with content unique to ``seed`` (smooth, so it survives compression recognisably)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
    if mode != "RGB":
        img = img.convert(mode)  # "L" (grayscale) or "CMYK": both occur in the real sets
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=95)
    return path


def reference(path: Path, size: int) -> torch.Tensor:
    """What torchvision's default_loader + Resize((size, size)) give for one file, as uint8 CHW."""
    with Image.open(path) as im:
        out = transforms.Resize((size, size))(im.convert("RGB"))
    return torch.from_numpy(np.asarray(out).transpose(2, 0, 1).copy())


@dataclass
class Fixture:
    name: str
    sources: list[Path]                 # what `--from` gets
    expected: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # split -> (path under root, label)
    gray: list[str] = field(default_factory=list)  # paths under root of grayscale files

    @property
    def counts(self) -> dict[str, int]:
        return {split: len(rows) for split, rows in self.expected.items()}


def _tar(path: Path, members: dict[str, Path], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for arcname, src in members.items():
            tf.add(src, arcname=arcname)
    return path


def _tree(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def make_tiny_imagenet(tmp: Path) -> Fixture:
    src = tmp / "unzipped" / "tiny-imagenet-200"
    wnids = ["n0300", "n0100", "n0200"]  # not sorted: labels follow wnids.txt
    src.mkdir(parents=True)
    (src / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (src / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in wnids))
    fx = Fixture("tiny_imagenet", [])
    train = []
    for k, wnid in enumerate(wnids):
        numbers = [0, 1, 2, 10][: 2 + k]  # 2..4 per class; 10 sorts after 2 (by number, not by string)
        for j in numbers[::-1]:           # written in reverse: order must not depend on creation order
            write_jpeg(src / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", 100 * k + j, (64, 64),
                       "L" if (k, j) == (1, 0) else "RGB")
        (src / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        train += [(f"tiny-imagenet-200/train/{wnid}/images/{wnid}_{j}.JPEG", k) for j in numbers]
    fx.gray.append(f"tiny-imagenet-200/train/{wnids[1]}/images/{wnids[1]}_0.JPEG")
    val_labels = [2, 0, 1, 1, 0]
    lines = []
    for i, k in enumerate(val_labels):
        write_jpeg(src / "val" / "images" / f"val_{i}.JPEG", 900 + i, (64, 64) if i else (50, 40))
        lines.append(f"val_{i}.JPEG\t{wnids[k]}\t0\t0\t10\t10")
    (src / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    write_jpeg(src / "test" / "images" / "test_0.JPEG", 999, (64, 64))  # unlabelled: unused
    fx.expected = {"train": train, "test": [(f"tiny-imagenet-200/val/images/val_{i}.JPEG", k)
                                            for i, k in enumerate(val_labels)]}
    archive = tmp / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for arcname, path in _tree(tmp / "unzipped").items():
            zf.write(path, arcname)
    fx.sources = [archive]
    return fx


def _cell(strings: list[str]) -> np.ndarray:
    cell = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cell[i, 0] = np.array([s])
    return cell


def make_stanford_dogs(tmp: Path) -> Fixture:
    dl = tmp / "dl"
    breeds = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]
    rows = {"train": [(0, 1), (2, 1), (0, 2), (1, 1)], "test": [(1, 2), (2, 2), (0, 3)]}  # (class, image number)
    fx = Fixture("stanford_dogs", [])
    (dl / "lists").mkdir(parents=True)
    for split, items in rows.items():
        files = [f"{breeds[k]}/{breeds[k].split('-')[0]}_{j}.jpg" for k, j in items]
        for f, (k, j) in zip(files, items):
            write_jpeg(dl / "Images" / f, 10 * k + j, (50 + 10 * j, 40))
        savemat(dl / "lists" / f"{split}_list.mat",
                {"file_list": _cell(files), "annotation_list": _cell([f[:-4] for f in files]),
                 "labels": np.array([[k + 1] for k, _ in items], dtype=np.float64)})
        fx.expected[split] = [(f"stanford_dogs/Images/{f}", k) for f, (k, _) in zip(files, items)]
    savemat(dl / "lists" / "file_list.mat", {"file_list": _cell(["unused"])})
    images_tar = _tar(tmp / "images.tar", {f"Images/{rel}": p for rel, p in _tree(dl / "Images").items()})
    lists_tar = _tar(tmp / "lists.tar", _tree(dl / "lists"))
    fx.sources = [images_tar, lists_tar]
    return fx


def _annotations(names: list[str], classes: list[int]) -> np.ndarray:
    dt = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    ann = np.empty((1, len(names)), dtype=dt)
    for i, (name, c) in enumerate(zip(names, classes)):
        ann[0, i] = (np.array([[1]], np.uint8), np.array([[2]], np.uint8), np.array([[30]], np.uint8),
                     np.array([[20]], np.uint8), np.array([[c]], np.uint8), np.array([name]))
    return ann


def make_stanford_cars(tmp: Path) -> Fixture:
    dl = tmp / "cars_download"  # a folder holding the extracted devkit, train and test images, test labels
    fx = Fixture("stanford_cars", [dl])
    classes = {"train": [3, 1, 2, 1], "test": [2, 3, 1]}  # 1-based, as in the devkit
    for split, cls in classes.items():
        names = [f"{i + 1:05d}.jpg" for i in range(len(cls))]
        for i, name in enumerate(names):
            write_jpeg(dl / f"cars_{split}" / name, 50 * (split == "test") + i, (60, 35 + i))
        fx.expected[split] = [(f"stanford_cars/cars_{split}/{n}", c - 1) for n, c in zip(names, cls)]
        mat = dl / "devkit" / "cars_train_annos.mat" if split == "train" else dl / "cars_test_annos_withlabels.mat"
        mat.parent.mkdir(parents=True, exist_ok=True)
        savemat(mat, {"annotations": _annotations(names, cls)})
    savemat(dl / "devkit" / "cars_meta.mat", {"class_names": _cell(["a", "b", "c"]).T})
    savemat(dl / "devkit" / "cars_test_annos.mat", {"annotations": _annotations(["00001.jpg"], [1])})
    return fx


def make_fgvc_aircraft(tmp: Path) -> Fixture:
    data = tmp / "extracted" / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "F/A-18", "Cessna 172"]  # names with a slash and a space occur
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    fx = Fixture("fgvc_aircraft", [tmp / "extracted" / "fgvc-aircraft-2013b"])
    rows = {"trainval": [(1, "1025794"), (0, "0034309"), (2, "0056978"), (1, "0062765")],
            "test": [(2, "1514522"), (0, "0062781"), (1, "0111111")]}
    for split, items in rows.items():
        (data / f"images_variant_{split}.txt").write_text("".join(f"{i} {variants[k]}\n" for k, i in items))
        for k, i in items:
            write_jpeg(data / "images" / f"{i}.jpg", int(i), (80, 50))
        fx.expected["train" if split == "trainval" else "test"] = [
            (f"fgvc-aircraft-2013b/data/images/{i}.jpg", k) for k, i in items]
    return fx


def make_cub200(tmp: Path) -> Fixture:
    base = tmp / "x" / "CUB_200_2011"
    species = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    # (image id, class 1-based, is_train, mode)
    rows = [(1, 1, 1, "RGB"), (2, 1, 0, "RGB"), (3, 2, 1, "L"), (4, 3, 0, "CMYK"), (5, 2, 0, "RGB"),
            (6, 3, 1, "RGB"), (7, 1, 1, "RGB")]
    fx = Fixture("cub200", [])
    rel = {i: f"{species[c - 1]}/{species[c - 1].split('.')[1]}_{i:04d}_{i}.jpg" for i, c, _, _ in rows}
    for i, c, _, mode in rows:
        write_jpeg(base / "images" / rel[i], i, (45, 60), mode)
    order = [4, 1, 7, 2, 3, 6, 5]  # images.txt order is the file order, not the id order
    (base / "images.txt").write_text("".join(f"{i} {rel[i]}\n" for i in order))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c, _, _ in rows))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t, _ in rows))
    (base / "classes.txt").write_text("".join(f"{k + 1} {s}\n" for k, s in enumerate(species)))
    info = {i: (c, t) for i, c, t, _ in rows}
    for split, want in (("train", 1), ("test", 0)):
        fx.expected[split] = [(f"CUB_200_2011/images/{rel[i]}", info[i][0] - 1) for i in order if info[i][1] == want]
    fx.gray.append(f"CUB_200_2011/images/{rel[3]}")
    (tmp / "x" / "attributes.txt").write_text("1 has_bill_shape::curved\n")  # beside the folder in the tgz
    fx.sources = [_tar(tmp / "CUB_200_2011.tgz", _tree(tmp / "x"), "w:gz")]
    return fx


MAKERS = {"tiny_imagenet": make_tiny_imagenet, "stanford_dogs": make_stanford_dogs,
          "stanford_cars": make_stanford_cars, "fgvc_aircraft": make_fgvc_aircraft, "cub200": make_cub200}


@pytest.fixture(params=list(MAKERS))
def fixture(request, tmp_path, monkeypatch) -> Fixture:
    fx = MAKERS[request.param](tmp_path / "fixture")
    cls = PAPER[fx.name]
    monkeypatch.setattr(cls, "num_classes", K)
    monkeypatch.setattr(cls, "sizes", fx.counts)
    return fx


def prepared(cli, fx: Fixture, root: Path) -> str:
    code, out, err = cli("data", "prepare", fx.name, *[a for s in fx.sources for a in ("--from", s)], "--data", root)
    assert code == 0, err
    return out


# -- parsing, import, decoding --------------------------------------------------------------------------------------
def test_prepare_from_official_layout_then_load_in_list_order(cli, fixture, tmp_path):
    root = tmp_path / "data"
    out = prepared(cli, fixture, root)
    assert "imported" in out and "ok" in out and len(out.strip().splitlines()) == 1
    cls = PAPER[fixture.name]
    for split, rows in fixture.expected.items():
        data = load_dataset(fixture.name, root, split)
        s = cls.image_size
        assert data.images.dtype == torch.uint8 and tuple(data.images.shape) == (len(rows), 3, s, s)
        assert data.labels.tolist() == [k for _, k in rows] and data.num_classes == K
        want = torch.stack([reference(root / rel, s) for rel, _ in rows])  # torchvision's Resize on PIL, exactly
        assert torch.equal(data.images, want)
        for rel in fixture.gray:
            if rel in [r for r, _ in rows]:
                img = data.images[[r for r, _ in rows].index(rel)]
                assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])  # grayscale file -> RGB
    small = load_dataset(fixture.name, root, "train", image_size=32)  # the run's size, from the stored one
    assert tuple(small.images.shape[1:]) == (3, 32, 32)


def test_cache_is_written_once_and_reused_until_a_file_changes(fixture, tmp_path, monkeypatch):
    from mpbench.data.archives import import_sources

    cls, root = PAPER[fixture.name], tmp_path / "data"
    import_sources(cls(), root, fixture.sources)
    first = cls().load(root, "train")
    cached = sorted(p.name for p in (root / "cache" / fixture.name).iterdir())
    stem = cached[0].split(".")[0]
    assert stem.startswith(f"train-{cls.image_size}-") and cached == [f"{stem}.labels.npy", f"{stem}.npy"]
    images = np.load(root / "cache" / fixture.name / f"{stem}.npy", allow_pickle=False)
    assert images.dtype == np.uint8 and torch.equal(torch.from_numpy(images), first.images)

    def no_decode(path, size):
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(jpeg, "decode_image", no_decode)
    again = cls().load(root, "train")
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    changed = root / fixture.expected["train"][0][0]
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    with pytest.raises(DataMissingError, match="cannot decode"):  # a changed file is decoded again
        cls().load(root, "train")


def test_verify_checks_counts_classes_and_catches_a_truncated_image(cli, fixture, tmp_path, monkeypatch):
    root = tmp_path / "data"
    prepared(cli, fixture, root)
    cls = PAPER[fixture.name]
    code, out, err = cli("data", "verify", fixture.name, "--data", root)
    counts = fixture.counts
    assert code == 0 and f"train {counts['train']}" in out and f"test {counts['test']}" in out, err

    monkeypatch.setattr(cls, "sizes", {**counts, "test": counts["test"] + 1})
    code, _, err = cli("data", "verify", fixture.name, "--data", root)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"test has {counts['test']} images, expected {counts['test'] + 1}" in err
    monkeypatch.setattr(cls, "sizes", counts)

    monkeypatch.setattr(cls, "num_classes", K + 1)  # a class without images in either split
    code, _, err = cli("data", "verify", fixture.name, "--data", root)
    assert code == 2 and ("has no train images" in err or f"expected {K + 1}" in err), err
    monkeypatch.setattr(cls, "num_classes", K)

    victim = root / fixture.expected["test"][-1][0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # what an interrupted extraction leaves
    clear_cache()
    code, _, err = cli("data", "verify", fixture.name, "--data", root)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(victim) in err
    assert f"mpbench data prepare {fixture.name} --from" in err


def test_missing_dataset_says_which_prepare_command(cli, tmp_path):
    for name, cls in PAPER.items():
        for args in (("prepare", name), ("verify", name)):
            code, _, err = cli("data", *args, "--data", tmp_path / "empty")
            assert code == 2 and len(err.strip().splitlines()) == 1, err
            assert f"mpbench data prepare {name} --from" in err and str(tmp_path / "empty") in err
        with pytest.raises(DataMissingError, match=f"mpbench data prepare {name} --from"):
            load_dataset(name, tmp_path / "empty", "test")


def test_a_missing_image_folder_is_named(tmp_path, monkeypatch):
    fx = make_stanford_dogs(tmp_path / "fx")
    monkeypatch.setattr(StanfordDogs, "num_classes", K)
    root = tmp_path / "data"
    from mpbench.data.archives import import_sources

    import_sources(StanfordDogs(), root, fx.sources)
    for p in sorted((root / "stanford_dogs" / "Images").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (root / "stanford_dogs" / "Images").rmdir()
    with pytest.raises(DataMissingError, match=r"missing \S*stanford_dogs/Images \(4 of the 4 train images"):
        StanfordDogs().load(root, "train")


# -- prepare --from: archives, md5, hostile and truncated input --------------------------------------------------------
def test_archive_md5_is_checked_when_published(cli, tmp_path, monkeypatch):
    fx = make_cub200(tmp_path / "fx")
    monkeypatch.setattr(CUB200, "num_classes", K)
    monkeypatch.setattr(CUB200, "sizes", fx.counts)
    digest = hashlib.md5(fx.sources[0].read_bytes()).hexdigest()
    monkeypatch.setattr(CUB200, "archive_md5", {fx.sources[0].name: digest})
    code, out, err = cli("data", "prepare", "cub200", "--from", fx.sources[0], "--data", tmp_path / "data")
    assert code == 0 and "1 archive md5 ok" in out, err
    monkeypatch.setattr(CUB200, "archive_md5", {fx.sources[0].name: "0" * 32})
    code, _, err = cli("data", "prepare", "cub200", "--from", fx.sources[0], "--data", tmp_path / "data2")
    assert code == 2 and digest in err and "download it again" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "data2" / "CUB_200_2011").exists()


@pytest.mark.parametrize("kind", ["zip", "tgz", "tar"])
def test_truncated_archive_is_a_one_line_error(cli, tmp_path, kind):
    folder = tmp_path / "tiny-imagenet-200"
    for i in range(6):
        write_jpeg(folder / "train" / "n01" / "images" / f"n01_{i}.JPEG", i, (64, 64))
    (folder / "wnids.txt").write_text("n01\n")
    archive = tmp_path / f"tiny-imagenet-200.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for rel, p in _tree(tmp_path).items():
                if p.suffix != ".zip":
                    zf.write(p, rel)
    else:
        _tar(archive, {f"tiny-imagenet-200/{rel}": p for rel, p in _tree(folder).items()},
             "w:gz" if kind == "tgz" else "w")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size * 2 // 3])
    root = tmp_path / "data"
    code, _, err = cli("data", "prepare", "tiny_imagenet", "--from", archive, "--data", root)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(archive) in err and "truncated or corrupt" in err, err
    assert not (root / "tiny-imagenet-200").exists() and not list(root.glob(".import-*"))


def test_hostile_archive_members_are_refused(cli, tmp_path):
    payload = tmp_path / "payload.txt"
    payload.write_text("x")
    evil_tar = tmp_path / "evil.tar"
    with tarfile.open(evil_tar, "w") as tf:
        tf.add(payload, arcname="CUB_200_2011/images.txt")
        tf.add(payload, arcname="../escaped.txt")
    evil_zip = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil_zip, "w") as zf:
        zf.writestr("/abs/escaped.txt", "x")
    evil_link = tmp_path / "link.tar"
    with tarfile.open(evil_link, "w") as tf:
        link = tarfile.TarInfo("CUB_200_2011/images.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    for archive in (evil_tar, evil_zip, evil_link):
        code, _, err = cli("data", "prepare", "cub200", "--from", archive, "--data", tmp_path / "data")
        assert code == 2 and "refusing" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "data" / "CUB_200_2011").exists()


def test_from_needs_every_part_and_rejects_builtin_and_missing_paths(cli, tmp_path, monkeypatch):
    fx = make_stanford_dogs(tmp_path / "fx")
    code, _, err = cli("data", "prepare", "stanford_dogs", "--from", fx.sources[0], "--data", tmp_path / "d")
    assert code == 2 and "holds no train_list.mat" in err and "lists.tar" in err  # images.tar alone
    code, _, err = cli("data", "prepare", "digits", "--from", fx.sources[0])
    assert code == 2 and "ship with a Python package" in err
    code, _, err = cli("data", "prepare", "cub200", "--from", tmp_path / "nope.tgz", "--data", tmp_path / "d")
    assert code == 2 and "no such file or folder" in err


def test_dogs_from_one_folder_holding_both_extracted_archives(tmp_path, monkeypatch):
    fx = make_stanford_dogs(tmp_path / "fx")
    monkeypatch.setattr(StanfordDogs, "num_classes", K)
    monkeypatch.setattr(StanfordDogs, "sizes", fx.counts)
    both = tmp_path / "both"
    for archive in fx.sources:
        with tarfile.open(archive) as tf:
            tf.extractall(both, filter="data")
    root = tmp_path / "data"
    msg = StanfordDogs().prepare(root, [both])
    assert "imported" in msg and "ok" in msg
    assert (both / "Images").is_dir()  # a folder is copied, never moved
    assert StanfordDogs().load(root, "test").labels.tolist() == [k for _, k in fx.expected["test"]]
    assert "already in place" in StanfordDogs().prepare(root, [root / "stanford_dogs"])
    for p in (root / "cache").rglob("*.npy"):
        p.unlink()
    assert "files present" in StanfordDogs().prepare(root)  # without --from: checks, decodes and caches
    assert len(list((root / "cache" / "stanford_dogs").glob("*.npy"))) == 4  # images + labels, both splits


def test_existing_sets_import_their_archives_with_md5(cli, tmp_path, monkeypatch):
    import pickle

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        labels = [i % 3 for i in range(n)]
        with open(folder / split, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": labels}, f)
    archive = _tar(tmp_path / "cifar-100-python.tar.gz", {f"cifar-100-python/{rel}": p
                                                          for rel, p in _tree(folder).items()}, "w:gz")
    monkeypatch.setattr(Cifar100, "sizes", {"train": 6, "test": 2})
    monkeypatch.setattr(Cifar100, "archive_md5", {archive.name: hashlib.md5(archive.read_bytes()).hexdigest()})
    monkeypatch.setattr(Cifar100, "md5", {s: hashlib.md5((folder / s).read_bytes()).hexdigest()
                                          for s in ("train", "test")})
    code, out, err = cli("data", "prepare", "cifar100", "--from", archive, "--data", tmp_path / "data")
    assert code == 0 and "1 archive md5 ok" in out and "2 md5 ok" in out, err

    mats = tmp_path / "svhn_dl"
    mats.mkdir()
    for split, n in (("train", 3), ("test", 2)):
        savemat(mats / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                              "y": np.arange(1, n + 1).reshape(-1, 1)})
    monkeypatch.setattr(SVHN, "sizes", {"train": 3, "test": 2})
    monkeypatch.setattr(SVHN, "md5", {})
    code, out, err = cli("data", "prepare", "svhn", "--from", mats / "train_32x32.mat",
                         "--from", mats / "test_32x32.mat", "--data", tmp_path / "data")
    assert code == 0 and (tmp_path / "data" / "svhn" / "test_32x32.mat").is_file(), err


# -- declarations, subsets --------------------------------------------------------------------------------------------
def test_every_dataset_declares_a_default_image_size():
    for entry in DATASETS.entries():
        size = entry.obj.default_image_size
        assert size is None or (isinstance(size, int) and size >= 1), entry.name
    assert DATASETS.get("digits").default_image_size > DATASETS.get("digits").image_size  # 8 px is the trap
    for name, cls in PAPER.items():
        assert issubclass(cls, JpegListDataset) and cls.channels == 3 and set(cls.sizes) == {"train", "test"}
        assert f"mpbench data prepare {name} --from" in cls.how_to_get and cls.citation
        assert cls.default_image_size <= cls.image_size  # stored large enough for the size runs use
    for name in ("stanford_dogs", "stanford_cars", "fgvc_aircraft", "cub200"):
        assert DATASETS.get(name).default_image_size == 84  # the paper's size for the fine-grained targets


def test_held_out_per_class_is_disjoint_from_first_per_class():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 0, 1, 2, 0])
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    data = ImageData(images, labels, 3)
    first = first_per_class(data, 2)
    held = held_out_per_class(data, 2, 2)
    ids = lambda d: d.images[:, 0, 0, 0].tolist()  # noqa: E731
    assert not set(ids(first)) & set(ids(held))
    # class 0 at 0,2,5,6,9: first two are 0,2; held out 5,6 (at most 2); class 1 at 1,4,7: held 7; class 2: none
    assert ids(held) == [5, 6, 7] and held.labels.tolist() == [0, 0, 1] and held.num_classes == 3
    assert ids(held_out_per_class(data, 2, 10)) == [5, 6, 7, 9]
    with pytest.raises(UsageError):
        held_out_per_class(data, 5, 1)
    with pytest.raises(UsageError):
        held_out_per_class(data, 1, 0)


def test_fashion_mnist_from_a_folder_of_gz_files_checks_md5(tmp_path, monkeypatch):
    import gzip
    import struct

    from mpbench.data.mnist import FashionMNIST

    folder = tmp_path / "downloads"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 4), ("t10k", 2)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                            ("labels-idx1", np.arange(n, dtype=np.uint8))):
            header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))
    monkeypatch.setattr(FashionMNIST, "sizes", {"train": 4, "test": 2})
    monkeypatch.setattr(FashionMNIST, "md5", {p.name: hashlib.md5(p.read_bytes()).hexdigest()
                                              for p in folder.iterdir()})
    assert "unpacked 4 files" in FashionMNIST().prepare(tmp_path / "data", [folder])
    assert load_dataset("fashion_mnist", tmp_path / "data", "test").labels.tolist() == [0, 1]
    monkeypatch.setattr(FashionMNIST, "md5", {n: "0" * 32 for n in FashionMNIST.md5})
    with pytest.raises(DataMissingError, match="corrupt or not the official file"):
        FashionMNIST().prepare(tmp_path / "data2", [folder])
