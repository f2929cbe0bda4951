"""The feature cache: in memory and on disk, reuse only when it matches, damaged or unwritable files."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from calexnet_fast import features, io
from calexnet_fast.backbones import cifar_resnet
from calexnet_fast.data import decode_images, synthetic_dataset
from calexnet_fast.features import FeatureCache, backbone_features, build_feature_cache


def tiny_backbone():
    torch.manual_seed(0)
    return cifar_resnet(8, n_classes=4, input_size=16)


@pytest.fixture(scope="module")
def synth():
    return synthetic_dataset(96, 32, 32, n_classes=4, image_size=16, seed=0)


def test_memory_and_disk_cache_hold_the_backbone_outputs(tmp_path, synth):
    bb = tiny_backbone()
    mem = build_feature_cache(bb, synth.test, batch_size=10, progress=False)
    with torch.no_grad():
        x = torch.stack([synth.test[i][0] for i in range(len(synth.test))])
        feats, logits = bb.features(x)
    assert mem.n_branches == 2 and len(mem) == 32 and mem.features[0].dtype == torch.float16
    for k in range(2):
        torch.testing.assert_close(mem.features[k], feats[k].half())
    torch.testing.assert_close(mem.backbone_logits, logits)
    assert torch.equal(mem.labels, synth.test.labels)

    path = tmp_path / "test.safetensors"
    disk = build_feature_cache(bb, synth.test, batch_size=7, storage="disk", path=path, progress=False)
    assert disk.on_disk and path.is_file()
    idx = torch.tensor([5, 0, 31, 7])
    fm, zm, ym = mem.gather(idx)
    fd, zd, yd = disk.gather(idx)
    order = torch.argsort(idx)  # the disk cache reads rows in sorted order
    for k in range(2):
        assert torch.equal(fd[k], fm[k][order])
    assert torch.equal(zd, zm[order]) and torch.equal(yd, ym[order])
    # the file is a standard safetensors file
    from safetensors.torch import load_file

    st = load_file(str(path))
    assert torch.equal(st["features.1"], mem.features[1]) and torch.equal(st["labels"], mem.labels)


def test_save_and_load_round_trip_every_storage_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (10,), generator=g)
    for dtype in (torch.float16, torch.float32, torch.bfloat16):
        f = torch.randn(10, 2, 3, 3, generator=g).to(dtype)
        cache = FeatureCache([f], torch.randn(10, 3, generator=g), y, {"dtype": str(dtype)})
        path = tmp_path / f"{dtype}.safetensors"
        cache.save(path)
        for storage in ("memory", "disk"):
            back = FeatureCache.load(path, storage)
            assert back.meta == cache.meta and back.on_disk == (storage == "disk")
            assert torch.equal(back.gather(torch.arange(10))[0][0], f)
        # and a disk cache saved again is the same file
        FeatureCache.load(path, "disk").save(tmp_path / "again.safetensors")
        assert io.file_sha256(tmp_path / "again.safetensors") == io.file_sha256(path)


def test_disk_cache_is_reused_only_when_it_matches(tmp_path, synth):
    bb = tiny_backbone()
    path = tmp_path / "c.safetensors"
    build_feature_cache(bb, synth.val, storage="disk", path=path, progress=False)
    calls = []
    bb.stages[0].register_forward_hook(lambda *a: calls.append(1))
    again = build_feature_cache(bb, synth.val, path=path, progress=False)
    assert not calls and not again.on_disk and len(again) == 32  # loaded into memory, no backbone pass
    with torch.no_grad():
        bb.stages[0][0].weight.mul_(2)  # other weights: the file no longer matches
    build_feature_cache(bb, synth.val, path=path, progress=False)
    assert calls
    build_feature_cache(bb, synth.val, path=path, progress=False, dtype=torch.float32)
    assert FeatureCache.load(path).features[0].dtype == torch.float32


def test_cache_errors(tmp_path, synth):
    bb = tiny_backbone()
    with pytest.raises(ValueError, match="path"):
        build_feature_cache(bb, synth.val, storage="disk")
    with pytest.raises(ValueError, match="storage"):
        build_feature_cache(bb, synth.val, storage="cloud")
    with pytest.raises(ValueError, match="dtype"):
        build_feature_cache(bb, synth.val, dtype=torch.int8)
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(RuntimeError, match="bad.safetensors"):
        FeatureCache.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        FeatureCache.load(tmp_path / "none.safetensors")


@pytest.mark.parametrize("damage", ["truncated", "flipped_bit"])
def test_damaged_disk_cache_is_detected_and_rebuilt(tmp_path, synth, damage):
    bb = tiny_backbone()
    path = tmp_path / "c.safetensors"
    good = build_feature_cache(bb, synth.val, storage="disk", path=path, progress=False).to_memory()
    data = bytearray(path.read_bytes())
    if damage == "truncated":  # the header is intact, the data is cut short
        del data[-100:]
    else:
        data[-7] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"c\.safetensors.*damaged.*delete it to rebuild"):
        FeatureCache.load(path, "disk")
    calls = []
    bb.stages[0].register_forward_hook(lambda *a: calls.append(1))
    with pytest.warns(UserWarning, match="rebuilding the feature cache"):
        again = build_feature_cache(bb, synth.val, storage="disk", path=path, progress=False)
    assert calls and again.on_disk
    for a, b in zip(again.gather(torch.arange(len(good)))[0], good.features, strict=True):
        assert torch.equal(a, b)
    assert io.verify_safetensors(path)


@pytest.mark.parametrize("where", ["reserve", "write"])
def test_disk_full_gives_a_clear_error_and_leaves_no_file(tmp_path, synth, monkeypatch, where):
    bb = tiny_backbone()
    path = tmp_path / "c.safetensors"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "reserve":
        monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    else:  # a file system that cannot reserve space: the plain writes fail part-way
        monkeypatch.setattr(os, "posix_fallocate", lambda *a: (_ for _ in ()).throw(OSError(errno.EOPNOTSUPP, "")))
        real, count = os.pwrite, {"n": 0}

        def pwrite(fd, data, offset):
            count["n"] += 1
            return full() if count["n"] > 3 else real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError, match=r"c\.safetensors.*disk is full") as e:
        build_feature_cache(bb, synth.val, storage="disk", path=path, progress=False)
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial file, no .tmp


def test_backbone_features_match_the_cache_builder(synth):
    bb = tiny_backbone().eval()
    x, y = decode_images(synth.test, batch_size=9)
    assert x.shape == (32, 3, 16, 16) and torch.equal(y, synth.test.labels)
    got = backbone_features(bb, x, batch_size=5)
    ref = build_feature_cache(bb, synth.test, dtype=torch.float32, progress=False)
    assert got.meta == {"source": "measure"} and torch.equal(got.labels, torch.zeros(32, dtype=torch.int64))
    for a, b in zip(got.features, ref.features, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(got.backbone_logits, ref.backbone_logits)
    with pytest.raises(ValueError, match="empty"):
        decode_images([])


def test_fingerprints_follow_weights_and_data(synth):
    bb = tiny_backbone()
    fp = features.model_fingerprint(bb)
    assert len(fp) == 16 and fp == features.model_fingerprint(tiny_backbone())
    with torch.no_grad():
        bb.stages[0][0].weight.add_(1)
    assert features.model_fingerprint(bb) != fp
    assert features.dataset_fingerprint(synth.val) != features.dataset_fingerprint(synth.test)


def test_pooled_cache_holds_the_working_maps_and_flips_double_the_images(tmp_path, synth):
    """``pool`` stores each branch map average-pooled to at most pool x pool (what the grid head reads
    first), a pooled disk cache is not mistaken for a full one, and ``with_flips`` caches both views."""
    from calexnet_fast.reference import working_map

    bb = tiny_backbone()
    full = build_feature_cache(bb, synth.test, batch_size=10, dtype=torch.float32, progress=False)
    pooled = build_feature_cache(bb, synth.test, batch_size=10, dtype=torch.float32, pool=4, progress=False)
    assert [s[1:] for s in pooled.branch_shapes] == [(4, 4), (4, 4)]
    for k in range(2):
        torch.testing.assert_close(pooled.features[k], working_map(full.features[k], 4))
    path = tmp_path / "test.safetensors"
    build_feature_cache(bb, synth.test, storage="disk", path=path, progress=False)
    again = build_feature_cache(bb, synth.test, storage="disk", path=path, pool=4, progress=False)
    assert again.branch_shapes[0][1:] == (4, 4)  # rebuilt, not reused
    flips = build_feature_cache(bb, synth.test.with_flips(), dtype=torch.float32, progress=False)
    n = len(synth.test)
    assert len(flips) == 2 * n and torch.equal(flips.labels_tensor()[n:], synth.test.labels)
    with torch.no_grad():
        x = torch.stack([synth.test[i][0] for i in range(3)]).flip(-1)
        mirrored, _ = bb.features(x)
    torch.testing.assert_close(flips.features[0][n : n + 3], mirrored[0])
    with pytest.raises(ValueError, match="pool"):
        build_feature_cache(bb, synth.test, pool=0, progress=False)
