"""Staged frozen backbones: splitting, state-dict round trips, placement, freezing, checkpoints, accuracy."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from calexnet_fast import backbones as B
from calexnet_fast.flops import segment_flops
from calexnet_fast.normalization import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture
def data_root(shared_data: Path) -> Path:
    """The shared data folder, holding ``pretrained/akamaster_resnet_cifar10`` (skips the test if absent)."""
    pretrained = shared_data / "pretrained" / "akamaster_resnet_cifar10"
    if not pretrained.is_dir():
        pytest.skip(f"pretrained CIFAR ResNets not found at {pretrained} (set CALEXNET_DATA to the data folder)")
    return shared_data


def _tv_resnet18_cifar(n_classes=10):
    m = torchvision.models.resnet18(weights=None, num_classes=n_classes)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics so that eval vs train mode and wrong loads are visible."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# --------------------------------------------------------------------------------------------------
# torchvision ResNets
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_resnet18_matches_torchvision_and_state_dict_round_trips(stem):
    torch.manual_seed(0)
    size = 32 if stem == "cifar" else 64
    bb = B.resnet18(10, stem=stem, input_size=size)
    _randomise_bn(bb)
    plain = _tv_resnet18_cifar() if stem == "cifar" else torchvision.models.resnet18(weights=None, num_classes=10)
    # staged -> plain torchvision (strict)
    plain.load_state_dict(bb.source_state_dict(), strict=True)
    plain.eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        ref = plain(x)
    torch.testing.assert_close(bb(x), ref, rtol=0, atol=0)
    # plain torchvision -> staged (strict), through both the constructor and load_source_state_dict
    other = _tv_resnet18_cifar() if stem == "cifar" else torchvision.models.resnet18(weights=None, num_classes=10)
    _randomise_bn(other, seed=1)
    other.eval()
    bb2 = B.resnet18(10, stem=stem, input_size=size, weights=other.state_dict())
    bb3 = B.resnet18(10, stem=stem, input_size=size)
    bb3.load_source_state_dict(other.state_dict())
    with torch.no_grad():
        ref2 = other(x)
    torch.testing.assert_close(bb2(x), ref2, rtol=0, atol=0)
    torch.testing.assert_close(bb3(x), ref2, rtol=0, atol=0)
    assert set(bb.source_state_dict()) == set(plain.state_dict())


def test_resnet18_weights_from_files(tmp_path):
    from safetensors.torch import save_file

    other = _tv_resnet18_cifar()
    _randomise_bn(other)
    other.eval()
    sd = {k: v.contiguous() for k, v in other.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = other(x)
    for name in ("w.safetensors", "w.pt"):
        bb = B.resnet18(10, stem="cifar", weights=tmp_path / name)
        torch.testing.assert_close(bb(x), ref, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"fc\.weight: expected \[100, 512\], got \[10, 512\]"):
        B.resnet18(100, stem="cifar", weights=tmp_path / "w.pt")
    with pytest.raises(ValueError, match="weights: expected an existing file"):
        B.resnet18(10, stem="cifar", weights=tmp_path / "missing.pt")


def test_branch_points_stage_and_block_granularity():
    bb = B.resnet18(10, stem="cifar", branch_points=["layer1", "layer2.0", "layer3"])
    assert bb.n_branches == 3 and len(bb.stages) == 4
    assert bb.branch_points == ["layer1", "layer2.0", "layer3"]
    assert bb.branch_channels == [64, 128, 256]
    assert bb.branch_shapes == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    assert bb.n_classes == 10 and bb.in_channels == 3 and bb.input_size == (32, 32)
    # "layer2" is the same cut as its last block "layer2.1"
    a = B.resnet18(10, stem="cifar", branch_points=["layer2"])
    b = B.resnet18(10, stem="cifar", branch_points=["layer2.1"])
    assert [list(s._modules) for s in a.stages] == [list(s._modules) for s in b.stages]


def test_resnet50_block_split_features():
    torch.manual_seed(0)
    bb = B.resnet50(7, input_size=64, branch_points=["layer1.1", "layer2", "layer3.2"])
    assert bb.branch_channels == [256, 512, 1024]
    assert bb.branch_shapes == [(256, 16, 16), (512, 8, 8), (1024, 4, 4)]
    plain = torchvision.models.resnet50(weights=None, num_classes=7)
    plain.load_state_dict(bb.source_state_dict(), strict=True)
    plain.eval()
    x = torch.randn(2, 3, 64, 64)
    feats, logits = bb.features(x)
    with torch.no_grad():
        h = plain.maxpool(plain.relu(plain.bn1(plain.conv1(x))))
        h = plain.layer1[1](plain.layer1[0](h))  # "layer1.1" is the middle block of layer1
        torch.testing.assert_close(feats[0], h, rtol=0, atol=0)
        h = plain.layer2(plain.layer1[2](h))
        torch.testing.assert_close(feats[1], h, rtol=0, atol=0)
        torch.testing.assert_close(logits, plain(x), rtol=0, atol=0)


def test_features_equal_forward_and_stage_chain():
    torch.manual_seed(0)
    bb = B.cifar_resnet(20, branch_points=["layer1.1", "layer2", "layer3.0"])
    _randomise_bn(bb)
    x = torch.randn(4, 3, 32, 32)
    feats, logits = bb.features(x)
    assert [tuple(f.shape[1:]) for f in feats] == bb.branch_shapes
    torch.testing.assert_close(logits, bb(x), rtol=0, atol=0)
    h = x
    for k, stage in enumerate(bb.stages[:-1]):
        h = stage(h)
        torch.testing.assert_close(feats[k], h, rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad", [["layer4"], ["layer4.1"], ["layer5"], ["layer2", "layer1"], ["layer1", "layer1.1"], []]
)
def test_bad_branch_points(bad):
    with pytest.raises(ValueError, match="branch_points"):
        B.resnet18(10, stem="cifar", branch_points=bad)


def test_bad_placement_arguments():
    with pytest.raises(ValueError, match="placement: expected None or 'flops'"):
        B.cifar_resnet(20, placement="uniform", n_branches=2)
    with pytest.raises(ValueError, match="n_branches: expected an int"):
        B.cifar_resnet(20, placement="flops")
    with pytest.raises(ValueError, match=r"n_branches: expected 1\.\.8"):
        B.cifar_resnet(20, placement="flops", n_branches=9)
    with pytest.raises(ValueError, match="branch_points: expected None with placement='flops'"):
        B.cifar_resnet(20, placement="flops", n_branches=2, branch_points=["layer1"])
    with pytest.raises(ValueError, match="stem: expected 'imagenet' or 'cifar'"):
        B.resnet18(10, stem="tiny")


CANDIDATES_56 = [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(9)][:-1]


@pytest.fixture(scope="module")
def resnet56_cumulative_flops():
    """Independent reference: split at every allowed boundary and read cumulative FLOPs off segment_flops."""
    seg = segment_flops(B.cifar_resnet(56, branch_points=CANDIDATES_56))
    return torch.tensor(seg[:-1], dtype=torch.float64).cumsum(0), sum(seg)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_flops_placement_picks_nearest_block_boundaries(k, resnet56_cumulative_flops):
    bb = B.cifar_resnet(56, placement="flops", n_branches=k)
    assert bb.n_branches == k
    candidates = CANDIDATES_56
    cum, total = resnet56_cumulative_flops
    expected = []
    for j in range(1, k + 1):
        d = (cum - total * j / (k + 1)).abs()
        expected.append(candidates[int(torch.argmin(d))])
    assert bb.branch_points == expected
    # and the chosen split reproduces those cumulative FLOPs
    got = torch.tensor(segment_flops(bb)[:-1], dtype=torch.float64).cumsum(0)
    want = torch.stack([cum[candidates.index(n)] for n in expected])
    torch.testing.assert_close(got, want)


def test_flops_placement_torchvision_is_increasing_and_distinct():
    bb = B.resnet18(10, stem="cifar", placement="flops", n_branches=6)
    order = [f"layer{i}.{j}" for i in (1, 2, 3, 4) for j in range(2)]
    idx = [order.index(p) for p in bb.branch_points]
    assert idx == sorted(idx) and len(set(idx)) == 6 and "layer4.1" not in bb.branch_points


# --------------------------------------------------------------------------------------------------
# Frozen means frozen
# --------------------------------------------------------------------------------------------------


def test_frozen_whatever_train_is_called_with():
    torch.manual_seed(0)
    bb = B.cifar_resnet(20)
    _randomise_bn(bb)
    x = torch.randn(8, 3, 32, 32)
    ref = bb(x)
    stats = {k: v.clone() for k, v in bb.state_dict().items()}
    parent = nn.Sequential(bb)  # a parent's .train() reaches the backbone too
    parent.train()
    assert bb.training  # the flag follows the caller ...
    assert all(not m.training for s in bb.stages for m in s.modules())  # ... the stages do not
    assert not any(p.requires_grad for p in bb.parameters())
    out = bb(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for k, v in bb.state_dict().items():
        assert torch.equal(v, stats[k]), f"{k} changed during a forward pass in train mode"
    # even a parent that re-enables gradients cannot make them flow into the backbone
    parent.requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    out = bb(xg)
    assert not out.requires_grad
    head = nn.Linear(10, 2)
    head(out).sum().backward()
    assert all(p.grad is None for p in bb.parameters())


def test_bad_inputs_to_backbone():
    bb = B.cifar_resnet(20)
    with pytest.raises(ValueError, match=r"x: expected a 4-D tensor \[B, C, H, W\], got shape \[3, 32, 32\]"):
        bb(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"x: expected 3 channels \(dimension 1\), got 1"):
        bb.features(torch.zeros(2, 1, 32, 32))


def test_normalisation_helpers():
    bb = B.cifar_resnet(20)
    assert bb.mean == IMAGENET_MEAN and bb.std == IMAGENET_STD
    img = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(bb.normalize(img), torch.stack([bb.normalization()(i) for i in img]))
    user = B.from_stages(
        [nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)],
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)),
        in_channels=1,
        input_size=8,
    )
    assert user.mean == (0.0,) and user.std == (1.0,)


# --------------------------------------------------------------------------------------------------
# User models
# --------------------------------------------------------------------------------------------------


def _user_stages():
    return [
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU()),
    ]


def test_from_stages_user_model():
    torch.manual_seed(0)
    stages = _user_stages()
    clf = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    full = nn.Sequential(*stages, clf).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = full(x)
    bb = B.from_stages(stages, clf, in_channels=3, input_size=16)
    assert bb.branch_points == ["stage0", "stage1"] and bb.branch_channels == [8, 16] and bb.n_classes == 5
    torch.testing.assert_close(bb(x), ref, rtol=0, atol=0)
    one = B.from_stages(stages, clf, in_channels=3, input_size=16, branch_points=["stage1"])
    assert one.n_branches == 1 and one.branch_shapes == [(16, 8, 8)]
    fl = B.from_stages(stages, clf, in_channels=3, input_size=16, placement="flops", n_branches=1)
    assert fl.n_branches == 1
    with pytest.raises(ValueError, match="stages: expected at least 2 feature stages"):
        B.from_stages(stages[:1], clf, in_channels=3, input_size=16)
    with pytest.raises(ValueError, match="branch_points: 'stage2' is not a branch point"):
        B.from_stages(stages, clf, in_channels=3, input_size=16, branch_points=["stage2"])
    with pytest.raises(ValueError, match="classifier: expected an nn.Module"):
        B.from_stages(stages, "linear", in_channels=3, input_size=16)


def test_staged_backbone_direct_and_its_checks():
    stages = _user_stages()
    with pytest.raises(ValueError, match="stages: expected at least 2 stages"):
        B.StagedBackbone(stages[:1], in_channels=3, input_size=16)
    with pytest.raises(ValueError, match="branch_points: expected 2 names"):
        B.StagedBackbone(stages, ["a"], in_channels=3, input_size=16)
    with pytest.raises(ValueError, match=r"expected the last stage to return logits \[B, n_classes\]"):
        B.StagedBackbone(stages, in_channels=3, input_size=16)  # last stage returns a feature map
    bb = B.StagedBackbone(
        [*stages[:2], nn.Sequential(stages[2], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))],
        in_channels=3,
        input_size=16,
    )
    assert bb.branch_points == ["stage0", "stage1"] and bb.n_classes == 4


# --------------------------------------------------------------------------------------------------
# CIFAR ResNets and their checkpoints
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", B.CIFAR_RESNET_DEPTHS)
def test_cifar_resnet_checkpoints_load_strictly(depth, data_root):
    path = B.find_pretrained_cifar_checkpoint(depth, data_root)
    bb = B.cifar_resnet(depth, checkpoint=path)
    raw = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
    src = bb.source_state_dict()
    for k, v in raw.items():
        assert torch.equal(src[k.removeprefix("module.")], v)
    assert bb.n_classes == 10 and bb.branch_channels == [16, 32]


def test_cifar_checkpoint_mismatch_errors(tmp_path, data_root):
    path20 = B.find_pretrained_cifar_checkpoint(20, data_root)
    with pytest.raises(RuntimeError, match=r"does not fit cifar_resnet56 \(9 blocks per stage, option-A") as e:
        B.cifar_resnet(56, checkpoint=path20)
    assert "missing keys [layer1.3.*, layer1.4.*" in str(e.value)
    assert str(e.value).endswith("the weights look like cifar_resnet20 (option-A shortcuts, 10 classes)")
    with pytest.raises(RuntimeError, match=r"linear\.weight: expected \[100, 64\], got \[10, 64\]"):
        B.cifar_resnet(20, n_classes=100, checkpoint=path20)
    (tmp_path / "corrupt.th").write_bytes(b"not a checkpoint at all")
    with pytest.raises(
        RuntimeError, match=r"checkpoint: could not read .*corrupt\.th.* torch\.load\(weights_only=True\) "
    ):
        B.cifar_resnet(20, checkpoint=tmp_path / "corrupt.th")
    # a pickle that weights_only refuses to execute (an arbitrary class) is rejected, not unpickled
    with open(tmp_path / "evil.th", "wb") as f:
        pickle.dump({"state_dict": {"x": _Marker()}}, f)
    with pytest.raises(RuntimeError, match="weights_only=True"):
        B.cifar_resnet(20, checkpoint=tmp_path / "evil.th")
    with pytest.raises(ValueError, match="root: no checkpoint resnet110"):
        B.find_pretrained_cifar_checkpoint(110, data_root)


class _Marker:
    pass


def test_cifar_resnet_depth_checks():
    with pytest.raises(ValueError, match="depth: expected 6n\\+2"):
        B.CifarResNet(21)
    bb = B.cifar_resnet(32, branch_points=["layer1.2", "layer2.4", "layer3.0"])
    assert bb.branch_shapes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    with pytest.raises(ValueError, match="'layer3.4' is not a branch point of cifar_resnet32"):
        B.cifar_resnet(32, branch_points=["layer3.4"])


@pytest.mark.slow
def test_pretrained_resnet56_accuracy_on_cifar10_jpeg(data_root):
    """Pretrained ResNet-56 on the JPEG CIFAR-10 test split: about 81-83 % (83.2 % on all 10,000).

    Uses the first 200 images of each class (2,000 in all, ~10 s on 2 cores; the full split takes ~45 s
    of inference there), which gave 83.15 %; the binomial standard error at n = 2,000 is ~0.8 points.
    """
    cifar_test = data_root / "cifar10-jpeg" / "test"
    if not cifar_test.is_dir():
        pytest.skip(f"CIFAR-10 JPEG test split not found at {cifar_test} (set CALEXNET_DATA to the data folder)")
    from PIL import Image
    from torchvision import transforms as T

    bb = B.cifar_resnet(56, checkpoint=B.find_pretrained_cifar_checkpoint(56, data_root))
    tf = T.Compose([T.ToTensor(), T.Normalize(bb.mean, bb.std)])
    classes = sorted(p.name for p in cifar_test.iterdir() if p.is_dir())
    assert len(classes) == 10
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((cifar_test / name).glob("*.jpg"))[:200]:
            with Image.open(f) as im:
                xs.append(tf(im.convert("RGB")))
            ys.append(label)
    x, y = torch.stack(xs), torch.tensor(ys)
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), 500):
            correct += int((bb(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum())
    acc = correct / len(x)
    assert 0.80 <= acc <= 0.86, f"ResNet-56 accuracy {acc:.4f} on {len(x)} JPEG test images"


# --------------------------------------------------------------------------------------------------
# Backbones by name (what run directories store)
# --------------------------------------------------------------------------------------------------


def test_backbone_spec_round_trip_build_and_trainable_weights(tmp_path):
    from safetensors.torch import save_file

    assert B.cifar_depth("cifar_resnet56") == 56 and B.cifar_depth("resnet18") is None
    spec = B.BackboneSpec(arch="cifar_resnet20", n_branches=2)
    assert B.BackboneSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    bb = B.build_backbone(spec)
    assert bb.name == "cifar_resnet20" and bb.n_branches == 2 and bb.mean == IMAGENET_MEAN
    # a network from trainable_backbone, once trained and saved, is what build_backbone loads as checkpoint
    torch.manual_seed(0)
    net = B.trainable_backbone("resnet18", 10, "cifar")
    _randomise_bn(net)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    staged = B.build_backbone(
        B.BackboneSpec(arch="resnet18", checkpoint=str(tmp_path / "w.safetensors"), branch_points=["layer2"])
    )
    assert staged.input_size == (32, 32) and staged.branch_points == ["layer2"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(staged(x), net.eval()(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"arch: expected one of \['resnet18', 'resnet50'\], cifar_resnet<depth>"):
        B.BackboneSpec(arch="vgg16")
    with pytest.raises(ValueError, match="give one or the other"):
        B.BackboneSpec(branch_points=["layer1"], n_branches=2)
    with pytest.raises(ValueError, match="arch: expected one of"):
        B.trainable_backbone("resnet34", 10)
