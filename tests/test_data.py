"""Data: CIFAR-10 / Fashion-MNIST / MNIST from shared/data, clear errors for bad files, downloads,
extraction, image folders, and the crop+flip augmentation against a naive reference."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import pickle
import shutil
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeprop.data import (
    CorruptDatasetError,
    DatasetNotFoundError,
    MicroBatchStream,
    RandomCropFlip,
    augment,
    load_dataset,
)
from pipeprop.data import files as data_files
from pipeprop.data.cifar import CIFAR100, read_cifar
from pipeprop.data.files import RemoteFile, download, extract_archive
from pipeprop.data.mnist import read_idx


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("PIPEPROP_DATA", raising=False)
    monkeypatch.delenv("PIPEPROP_CACHE", raising=False)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One cache folder per test session, so the CIFAR archive is extracted once (and removed at the end)."""
    folder = tmp_path_factory.mktemp("pipeprop-cache")
    yield folder
    _cifar10.cache_clear()
    shutil.rmtree(folder, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _cifar10(shared: Path, cache: Path):
    return load_dataset("cifar10", data_dir=shared, cache_dir=cache, download=False)


# ------------------------------------------------------------------------------------------ shared data
def test_cifar10_from_shared_data(shared_data, cache):
    ds = _cifar10(shared_data, cache)
    assert ds.train.images.shape == (50_000, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.test.images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(ds.train.labels, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(ds.test.labels, minlength=10).tolist() == [1000] * 10
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck" and ds.num_classes == 10
    mean = ds.train.images.float().mean(dim=(0, 2, 3)) / 255  # shared/data/README: (0.4914, 0.4822, 0.4465)
    torch.testing.assert_close(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=2e-4, rtol=0)
    assert Path(ds.source).is_relative_to(cache)  # extracted into the cache, not the shared folder


def test_cifar10_is_extracted_once(shared_data, cache):
    _cifar10(shared_data, cache)
    extracted = list((cache / "extracted").iterdir())
    stamp = extracted[0].stat().st_mtime_ns
    again = load_dataset("cifar10", data_dir=shared_data, cache_dir=cache, download=False)
    assert list((cache / "extracted").iterdir()) == extracted and extracted[0].stat().st_mtime_ns == stamp
    assert torch.equal(again.test.labels, _cifar10(shared_data, cache).test.labels)


def test_fashion_mnist_via_pipeprop_data_env(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPEPROP_DATA", str(shared_data))
    ds = load_dataset("fashion-mnist", cache_dir=tmp_path, download=False)
    assert ds.train.images.shape == (60_000, 1, 28, 28) and ds.test.images.shape == (10_000, 1, 28, 28)
    assert torch.bincount(ds.train.labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10


def test_mnist_without_train_images_names_the_file(shared_data, tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte.gz") as info:
        load_dataset("mnist", data_dir=shared_data, cache_dir=tmp_path, download=False)
    assert "mnist-10k" in str(info.value)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data_files.urllib.request, "urlopen", offline)
    with pytest.raises(DatasetNotFoundError, match="could not download train-images-idx3-ubyte.gz.*no network"):
        load_dataset("mnist", data_dir=shared_data, cache_dir=tmp_path, download=True)


def test_mnist_10k_fallback(shared_data, tmp_path):
    ds = load_dataset("mnist-10k", data_dir=shared_data, cache_dir=tmp_path)
    assert ds.train.images.shape == (10_000, 1, 28, 28) and ds.test.images.shape == (10_000, 1, 28, 28)
    # shared/data/README: the class counts of the first 10,000 official training labels
    assert torch.bincount(ds.train.labels).tolist() == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]


# ------------------------------------------------------------------------------------------ errors
def _write_cifar_batch(path: Path, n: int, label_key: str = "labels", classes: int = 10, shape=(3072,)) -> None:
    rng = np.random.default_rng(0)
    d = {"data": rng.integers(0, 256, (n,) + shape, dtype=np.uint8), label_key: list(rng.integers(0, classes, n))}
    path.write_bytes(pickle.dumps(d, protocol=2))


def _tiny_cifar10(root: Path, n: int = 20) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write_cifar_batch(folder / name, n)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    return folder


def test_corrupt_archive_gives_a_clear_error(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"this is not a gzip file" * 100)
    with pytest.raises(CorruptDatasetError, match=r"cifar-10-python.tar.gz is not a readable .tar.gz.*Delete or replace"):
        load_dataset("cifar10", data_dir=tmp_path, cache_dir=tmp_path / "cache", download=False)


def test_missing_batch_file_is_named(tmp_path):
    folder = _tiny_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(CorruptDatasetError, match="lacks data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path, cache_dir=tmp_path / "cache", download=False)


def test_wrong_structure_and_counts_are_rejected(tmp_path):
    folder = _tiny_cifar10(tmp_path)
    with pytest.raises(CorruptDatasetError, match="expected 50000"):
        load_dataset("cifar10", data_dir=tmp_path, cache_dir=tmp_path / "cache", download=False)
    _write_cifar_batch(folder / "data_batch_2", 20, shape=(100,))
    with pytest.raises(CorruptDatasetError, match=r"data_batch_2: 'data' must be uint8 \[N, 3072\]"):
        load_dataset("cifar10", data_dir=tmp_path, cache_dir=tmp_path / "cache", download=False)
    (folder / "data_batch_2").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CorruptDatasetError, match="data_batch_2.*corrupt"):
        load_dataset("cifar10", data_dir=tmp_path, cache_dir=tmp_path / "cache", download=False)
    _write_cifar_batch(folder / "data_batch_2", 20, classes=12)
    with pytest.raises(CorruptDatasetError, match="labels outside 0..9"):
        load_dataset("cifar10", data_dir=tmp_path, cache_dir=tmp_path / "cache", download=False)


def test_nothing_found_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPEPROP_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar100", data_dir=tmp_path / "explicit", cache_dir=tmp_path / "cache", download=False)
    msg = str(info.value)
    assert "explicit" in msg and "env" in msg and "cache" in msg and "data_dir" in msg
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("imagenet-folder")


def test_cifar100_layout_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _write_cifar_batch(folder / "train", 30, label_key="fine_labels", classes=100)
    _write_cifar_batch(folder / "test", 10, label_key="fine_labels", classes=100)
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    ds = read_cifar(CIFAR100, folder, check_counts=False)
    raw = pickle.loads((folder / "train").read_bytes())
    assert torch.equal(ds.train.images, torch.from_numpy(raw["data"].reshape(-1, 3, 32, 32)))
    assert ds.train.labels.tolist() == [int(v) for v in raw["fine_labels"]]
    assert ds.num_classes == 100 and ds.classes[5] == "c5"


# ------------------------------------------------------------------------------------------ files
def test_download_checks_the_md5(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc" * 1000)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    got = download(RemoteFile("f.bin", (src.as_uri(),), md5), tmp_path / "dl")
    assert got.read_bytes() == src.read_bytes()
    with pytest.raises(DatasetNotFoundError, match="checksum mismatch"):
        download(RemoteFile("g.bin", (src.as_uri(),), "0" * 32), tmp_path / "dl")
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["f.bin"]  # nothing half-written left


def test_extract_archive_once(tmp_path):
    archive = tmp_path / "thing.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"hello"
        info = tarfile.TarInfo("thing/a.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    out = extract_archive(archive, tmp_path / "cache")
    assert (out / "thing" / "a.txt").read_bytes() == b"hello"
    (out / "thing" / "marker").write_text("x")
    assert extract_archive(archive, tmp_path / "cache") == out and (out / "thing" / "marker").exists()


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_damaged_archive_is_detected(tmp_path, damage):
    archive = tmp_path / "thing.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
        info = tarfile.TarInfo("thing/blob")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    raw = archive.read_bytes()
    bad = raw[: len(raw) // 2] if damage == "truncate" else raw[:5000] + bytes(64) + raw[5064:]
    archive.write_bytes(bad)
    with pytest.raises(CorruptDatasetError, match="thing.tar.gz is not a readable"):
        extract_archive(archive, tmp_path / "cache")
    assert not any((tmp_path / "cache" / "extracted").iterdir())  # nothing half-extracted left


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_idx_reader_and_truncated_file(tmp_path):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    p = tmp_path / "x-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(_idx_bytes(arr)))
    assert np.array_equal(read_idx(p), arr)
    p.write_bytes(gzip.compress(_idx_bytes(arr)[:-10]))
    with pytest.raises(CorruptDatasetError, match="truncated"):
        read_idx(p)
    p.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(CorruptDatasetError, match="corrupt"):
        read_idx(p)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    ds = load_dataset("imagenet-folder", data_dir=tmp_path, image_size=8)
    assert ds.classes == ("cat", "dog") and ds.num_classes == 2
    assert ds.train.images.shape == (6, 3, 8, 8) and ds.test.images.shape == (4, 3, 8, 8)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # a single-colour image stays that colour after resize and crop
    Image.fromarray(np.full((10, 20, 3), (10, 200, 30), dtype=np.uint8)).save(tmp_path / "train" / "cat" / "9.png")
    ds = load_dataset("imagenet-folder", data_dir=tmp_path, image_size=8)
    assert ds.train.images[3].reshape(3, -1).float().mean(1).tolist() == [10.0, 200.0, 30.0]


# ------------------------------------------------------------------------------------------ augmentation
def _naive_candidates(img: torch.Tensor, pad: int):
    """Every padded crop and its mirror, written with explicit loops over output pixels."""
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=img.dtype)
    for i in range(h):
        for j in range(w):
            padded[:, i + pad, j + pad] = img[:, i, j]
    out = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out[(dy, dx, False)] = crop
            out[(dy, dx, True)] = torch.stack([crop[:, :, w - 1 - j] for j in range(w)], dim=2)
    return out


@pytest.mark.parametrize("batch", [1, 6])
def test_augment_outputs_are_padded_crops_or_their_mirrors(batch):
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randint(1, 256, (batch, 3, 6, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    seen = set()
    for _ in range(40):
        out = augment(imgs, gen)
        assert out.dtype == torch.uint8 and out.shape == imgs.shape
        for b in range(batch):
            hits = [k for k, v in _naive_candidates(imgs[b], 4).items() if torch.equal(v, out[b])]
            assert hits, "output is not a padded crop (or its mirror) of the input"
            seen.update(hits)
    flips = sum(k[2] for k in seen)
    assert 0 < flips < len(seen)  # both flipped and unflipped crops occur
    assert len({k[:2] for k in seen}) > 20  # many different offsets occur


def test_augment_is_seeded_and_distribution_is_uniform():
    imgs = torch.randint(1, 256, (1, 1, 4, 4), dtype=torch.uint8)
    a = [augment(imgs, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    crop = RandomCropFlip(padding=1, flip=True)
    gen = torch.Generator().manual_seed(0)
    cands = _naive_candidates(imgs[0], 1)
    counts: dict = {}
    for _ in range(1800):
        out = crop(imgs, gen)[0]
        key = next(k for k, v in cands.items() if torch.equal(v, out))
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 18  # 9 offsets x 2 flips
    assert min(counts.values()) > 50 and max(counts.values()) < 150  # ~100 each
    assert torch.equal(RandomCropFlip(padding=0, flip=False)(imgs, gen), imgs)


def test_stream_with_augment_resumes_exactly(tmp_path):
    folder = _tiny_cifar10(tmp_path, n=12)
    from pipeprop.data.cifar import CIFAR10

    ds = read_cifar(CIFAR10, folder, check_counts=False)
    s1 = MicroBatchStream(ds, batch_size=1, epochs=2, seed=3, augment=augment)
    it = iter(s1)
    for _ in range(5):
        next(it)
    state = s1.state_dict()
    rest = [x for x, _ in it]
    s2 = MicroBatchStream(ds, batch_size=1, epochs=2, seed=99, augment=augment)
    s2.load_state_dict(state)
    again = [x for x, _ in s2]
    assert len(rest) == len(again) == 115 and all(torch.equal(a, b) for a, b in zip(rest, again))
    assert rest[0].dtype == torch.float32 and rest[0].shape == (1, 3, 32, 32)
