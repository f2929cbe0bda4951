"""calexnet_fast.data on fixtures written in the exact official formats (and on the real data if present)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from calexnet_fast import data
from calexnet_fast.normalization import NORMALIZATIONS, normalization_for


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("CALEXNET_") and k.endswith("_DIR") or k == "CALEXNET_DATA":
            monkeypatch.delenv(k, raising=False)


def _rng_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path: Path, obj) -> None:
    # the official files are protocol-2 pickles with bytes keys (written by Python 2)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 20) -> dict:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    _dump(d / "batches.meta", {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072})
    all_x, all_y = [], []
    for i in range(1, 6):
        x = _rng_images(per_batch, i)
        y = [(j + i) % 10 for j in range(per_batch)]
        _dump(
            d / f"data_batch_{i}",
            {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": y,
                b"data": x,
                b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
            },
        )
        all_x.append(x)
        all_y += y
    xt = _rng_images(per_batch, 99)
    yt = [j % 10 for j in range(per_batch)]
    _dump(
        d / "test_batch",
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": yt,
            b"data": xt,
            b"filenames": [b"t.png"] * per_batch,
        },
    )
    return {"x": np.concatenate(all_x), "y": np.array(all_y), "xt": xt, "yt": np.array(yt)}


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 40) -> dict:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    fine_names = [f"fine{i}".encode() for i in range(100)]
    coarse_names = [f"coarse{i}".encode() for i in range(20)]
    _dump(d / "meta", {b"fine_label_names": fine_names, b"coarse_label_names": coarse_names})
    out = {}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        fine = [(j * 7) % 100 for j in range(n)]
        coarse = [f // 5 for f in fine]
        x = _rng_images(n, seed)
        _dump(
            d / split,
            {
                b"filenames": [b"f.png"] * n,
                b"batch_label": split.encode(),
                b"fine_labels": fine,
                b"coarse_labels": coarse,
                b"data": x,
            },
        )
        out[split] = (x, np.array(fine), np.array(coarse))
    return out


def write_imagefolder(
    root: Path, splits=("train", "test"), classes=("cat", "dog", "emu"), per_class=6, size=8, ext=".png"
) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for s in splits:
        for c in classes:
            (root / s / c).mkdir(parents=True)
            for j in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    root / s / c / f"{j:04d}{ext}"
                )


# --------------------------------------------------------------------------------------------------


def test_cifar10_pickles_pixels_labels_and_split(tmp_path):
    ref = write_cifar10(tmp_path)
    s = data.load_dataset("cifar10", tmp_path, val_size=20, normalization="none")
    assert s.classes[0] == "airplane" and s.n_classes == 10
    assert (len(s.train), len(s.val), len(s.test)) == (80, 20, 20)
    assert s.val_source == "train"
    # official layout: 1024 red, 1024 green, 1024 blue values, row-major 32x32
    x0, y0 = s.test[0]
    expected = torch.from_numpy(ref["xt"][0].reshape(3, 32, 32)).float() / 255
    torch.testing.assert_close(x0, expected)
    assert y0 == ref["yt"][0]
    # train + val together are exactly the 100 training images, stratified (2 per class in val)
    assert sorted(s.train.labels.tolist() + s.val.labels.tolist()) == sorted(ref["y"].tolist())
    assert torch.bincount(s.val.labels, minlength=10).tolist() == [2] * 10


def test_cifar100_coarse_and_fine(tmp_path):
    ref = write_cifar100(tmp_path)
    coarse = data.load_dataset("cifar100-coarse", tmp_path / "cifar-100-python", val_size=0.25)
    fine = data.load_dataset("cifar100", tmp_path, val_size=0.25)
    assert coarse.n_classes == 20 and coarse.classes[3] == "coarse3"
    assert fine.n_classes == 100 and fine.classes[42] == "fine42"
    assert len(coarse.test) == 40 and len(coarse.train) + len(coarse.val) == 200
    assert coarse.test.labels.tolist() == ref["test"][2].tolist()
    assert fine.test.labels.tolist() == ref["test"][1].tolist()
    # the same split seed picks the same validation images for both label sets
    assert torch.equal(coarse.val.images, fine.val.images)


def test_imagefolder_with_and_without_valid(tmp_path):
    cinic = tmp_path / "CINIC-10"
    write_imagefolder(cinic, splits=("train", "valid", "test"), per_class=4)
    s = data.load_dataset("cinic10", cinic)
    assert s.val_source == "official" and (len(s.train), len(s.val), len(s.test)) == (12, 12, 12)
    assert s.classes == ["cat", "dog", "emu"] and s.train.images.shape == (12, 3, 8, 8)

    plain = tmp_path / "plain"
    write_imagefolder(plain, splits=("train", "test"), per_class=10, ext=".jpg")
    s2 = data.load_dataset("imagefolder", plain, val_size=6, split_seed=3)
    assert s2.val_source == "train" and len(s2.val) == 6 and len(s2.train) == 24
    assert torch.bincount(s2.val.labels).tolist() == [2, 2, 2]
    # cifar10 detects an ImageFolder tree as well as the pickles
    s3 = data.load_dataset("cifar10", plain, val_size=6, split_seed=3)
    assert torch.equal(s3.val.labels, s2.val.labels)


def test_large_images_stay_lazy_and_are_resized(tmp_path):
    write_imagefolder(tmp_path, per_class=2, size=80)
    s = data.load_dataset("imagefolder", tmp_path, val_size=3, image_size=48)
    assert s.train.images is None and s.train.paths is not None
    x, _ = s.test[0]
    assert x.shape == (3, 48, 48)
    xa, _ = s.train.with_options(augment=True)[0]
    assert xa.shape == (3, 48, 48)


def test_environment_variables(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "base")
    monkeypatch.setenv("CALEXNET_DATA", str(tmp_path / "base"))
    assert data.resolve_data_dir("cifar10") == tmp_path / "base" / "cifar-10-batches-py"
    monkeypatch.setenv("CALEXNET_CIFAR10_DIR", str(tmp_path / "base" / "cifar-10-batches-py"))
    s = data.load_dataset("cifar10", val_size=10)
    assert len(s.val) == 10


def test_missing_and_malformed_directories_say_what_is_expected(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"--data-dir.*CALEXNET_CIFAR10_DIR.*data_batch_1"):
        data.load_dataset("cifar10")
    with pytest.raises(ValueError, match="does not exist"):
        data.load_dataset("cifar100", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"neither the official pickles.*contains nothing"):
        data.load_dataset("cifar10", tmp_path / "empty")
    monkeypatch.setenv("CALEXNET_DATA", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"cifar-100-python"):
        data.load_dataset("cifar100")
    # a pickle with the wrong content
    bad = tmp_path / "bad"
    bad.mkdir()
    _dump(bad / "meta", {b"fine_label_names": [b"a"]})
    _dump(
        bad / "train",
        {b"data": np.zeros((2, 10), np.uint8), b"fine_labels": [0, 0], b"coarse_labels": [0, 0]},
    )
    with pytest.raises(ValueError, match="coarse_label_names"):
        data.load_dataset("cifar100-coarse", bad)
    with pytest.raises(ValueError, match=r"uint8 \[N, 3072\]"):
        data.load_dataset("cifar100", bad)
    # an ImageFolder tree whose splits disagree on the classes
    write_imagefolder(tmp_path / "mix", splits=("train",), classes=("a", "b"))
    write_imagefolder(tmp_path / "mix", splits=("test",), classes=("a", "c"))
    with pytest.raises(ValueError, match="differ"):
        data.load_dataset("imagefolder", tmp_path / "mix")
    (tmp_path / "notree" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="train/ and test/"):
        data.load_dataset("cinic10", tmp_path / "notree")
    with pytest.raises(ValueError, match="dataset: expected one of"):
        data.load_dataset("mnist", tmp_path)


def test_pickles_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    d = tmp_path / "evil"
    d.mkdir()
    _dump(d / "meta", {b"fine_label_names": [b"a"], b"coarse_label_names": [b"b"]})
    _dump(d / "train", {b"data": Evil(), b"coarse_labels": [0]})
    with pytest.raises(ValueError, match="not allowed"):
        data.load_dataset("cifar100-coarse", d)
    assert not (tmp_path / "pwned").exists()


def test_stratified_split_is_deterministic_and_exact():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    tr, va = data.stratified_split(labels, 10, seed=7)
    tr2, va2 = data.stratified_split(labels, 10, seed=7)
    _, va3 = data.stratified_split(labels, 10, seed=8)
    assert torch.equal(va, va2) and torch.equal(tr, tr2) and not torch.equal(va, va3)
    assert torch.bincount(labels[va]).tolist() == [5, 3, 2]
    assert sorted(tr.tolist() + va.tolist()) == list(range(100))
    _, vf = data.stratified_split(labels, 0.1, seed=0)
    assert vf.numel() == 10
    # largest remainders make an awkward total exact
    _, v7 = data.stratified_split(labels, 7, seed=0)
    assert v7.numel() == 7
    for bad in (0, 100, 1.5, -0.1):
        with pytest.raises(ValueError, match="val_size"):
            data.stratified_split(labels, bad)


def test_stratified_subset_keeps_class_proportions_and_names_the_option():
    train = data.synthetic_dataset(60, 10, 10, n_classes=3, image_size=8).train
    sub = data.stratified_subset(train, 30, seed=4)
    assert len(sub) == 30 and torch.equal(sub.labels, data.stratified_subset(train, 30, seed=4).labels)
    assert torch.bincount(sub.labels).tolist() == [n // 2 for n in torch.bincount(train.labels).tolist()]
    assert not torch.equal(sub.images, data.stratified_subset(train, 30, seed=5).images)
    for bad in (0, 60):
        with pytest.raises(ValueError, match=f"--train-subset: expected 1..59, got {bad}"):
            data.stratified_subset(train, bad, name="--train-subset")


def test_normalisation_and_augmentation():
    s = data.synthetic_dataset(20, 10, 10, n_classes=2, image_size=16, normalization=NORMALIZATIONS["cifar10"])
    raw = s.train.images[3].float() / 255
    x, _ = s.train[3]
    mean = torch.tensor(NORMALIZATIONS["cifar10"].mean).view(3, 1, 1)
    std = torch.tensor(NORMALIZATIONS["cifar10"].std).view(3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std)
    aug = s.train.with_options(augment=True)
    torch.manual_seed(0)
    a1 = torch.stack([aug[i][0] for i in range(10)])
    torch.manual_seed(0)
    a2 = torch.stack([aug[i][0] for i in range(10)])
    assert torch.equal(a1, a2) and a1.shape == (10, 3, 16, 16)
    assert not torch.equal(a1, torch.stack([s.train[i][0] for i in range(10)]))
    assert normalization_for("cifar_resnet56").name == "imagenet"
    assert normalization_for("resnet18", "cinic10").name == "cinic10"
    with pytest.raises(ValueError, match="normalization"):
        normalization_for("resnet18", "bogus")


def test_synthetic_is_deterministic_balanced_and_learnable():
    a = data.synthetic_dataset(200, 100, 100, n_classes=4, seed=1)
    b = data.synthetic_dataset(200, 100, 100, n_classes=4, seed=1)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert torch.bincount(a.train.labels).tolist() == [50] * 4
    # nearest class mean on raw pixels is far above chance (0.25)
    xtr = a.train.images.float().flatten(1)
    means = torch.stack([xtr[a.train.labels == c].mean(0) for c in range(4)])
    xte = a.test.images.float().flatten(1)
    acc = (torch.cdist(xte, means).argmin(1) == a.test.labels).float().mean()
    assert acc > 0.6


@pytest.mark.slow
def test_real_cifar10_jpeg(shared_data):
    root = shared_data / "cifar10-jpeg"
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set CALEXNET_DATA to the shared data folder)")
    s = data.load_dataset("cifar10", root)
    assert (len(s.train), len(s.val), len(s.test)) == (45000, 5000, 10000)
    assert s.classes[:3] == ["airplane", "automobile", "bird"]
    assert torch.bincount(s.val.labels).tolist() == [500] * 10
    assert s.train.images.shape == (45000, 3, 32, 32)


def test_with_flips_appends_the_mirrored_images():
    ds = data.synthetic_dataset(12, 4, 4, n_classes=3, image_size=8, seed=0).train
    both = ds.with_flips()
    assert len(both) == 24 and torch.equal(both.labels, ds.labels.repeat(2))
    assert torch.equal(both[13][0], ds[1][0].flip(-1)) and torch.equal(both[1][0], ds[1][0])
    lazy = data.ImageDataset(torch.zeros(1, dtype=torch.int64), ["a"], paths=["x.jpg"])
    with pytest.raises(ValueError, match="in-memory"):
        lazy.with_flips()
