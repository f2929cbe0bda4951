"""Bring your own backbone: any classifier split into a staged frozen backbone (module tree or torch.fx),
weights from local files with clear mismatch reports, models by source on the command line, the backbone's
own normalisation and input size, class maps, small-dataset defaults, and the whole CLI on a user model file.

Random weights and tiny inputs throughout; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import textwrap
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from calexnet_fast import Cascade, ReferenceCascade, cli, data
from calexnet_fast import backbones as B
from calexnet_fast.normalization import IMAGENET_MEAN, Normalization, statistics_mismatch
from calexnet_fast.run import Run, RunError, data_and_backbone

# tiny tensors: one thread is fastest, and immune to OpenMP spin-waits on a busy machine
pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_bn(model: nn.Module, seed: int = 0, size: int = 32) -> nn.Module:
    """Trained-looking BatchNorm: random affine parameters, running statistics measured on random images (an
    untrained network in eval mode shrinks its activations layer after layer until every sample looks alike)."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calls below
        if m.weight is not None:
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, size, size, generator=g))
    return model.eval()


def _check_cascades(bb: B.StagedBackbone, x: torch.Tensor, make_head) -> None:
    """Cascade == ReferenceCascade (and its TorchScript form after a save/load round trip), with thresholds that
    let samples leave at every exit (branch k: the most confident 1/(K + 2 - k) of its survivors; each
    threshold half-way between two confidences, away from ties)."""
    heads = [make_head(c, bb.n_classes, dim=16, k=4, seed=k) for k, c in enumerate(bb.branch_channels)]
    ref = ReferenceCascade(bb, heads)
    with torch.no_grad():
        sim = ref.simulate(x)
    conf = sim.branch_logits.softmax(-1).amax(-1)  # [K, B]
    alive, thresholds = torch.ones(x.shape[0], dtype=torch.bool), []
    for k in range(bb.n_branches):
        c = conf[k][alive].sort(descending=True).values
        m = max(1, len(c) // (bb.n_branches + 1 - k))
        thresholds.append(float(c[m - 1] + c[m]) / 2)
        alive &= conf[k] < thresholds[-1]
    ref.set_thresholds(torch.tensor(thresholds)[:, None].expand(-1, bb.n_classes).contiguous())
    expect = ref(x)
    assert set(expect.exit_index.tolist()) == set(range(1, bb.n_branches + 2)), expect.exit_index
    assert torch.equal(expect.exit_index, ref.decide(sim).exit_index)
    fast = Cascade.from_reference(ref)
    got = fast(x)
    assert torch.equal(got.exit_index, expect.exit_index)
    torch.testing.assert_close(got.logits, expect.logits, rtol=1e-4, atol=1e-4)
    buf = io.BytesIO()
    torch.jit.save(fast.to_torchscript(), buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)(x)
    assert torch.equal(loaded.exit_index, expect.exit_index)
    torch.testing.assert_close(loaded.logits, expect.logits, rtol=1e-4, atol=1e-4)


def _same_as_model(bb: B.StagedBackbone, model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(bb(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        feats, logits = bb.features(x)
    assert [tuple(f.shape[1:]) for f in feats] == bb.branch_shapes
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


# --------------------------------------------------------------------------------------------------
# any model, split at named modules or by FLOPs
# --------------------------------------------------------------------------------------------------

TORCHVISION = {
    "resnet18": ["layer1", "layer3.0"],
    "mobilenet_v3_small": ["features.2", "features.8"],
    "efficientnet_b0": ["features.2", "features.5.1"],
    "convnext_tiny": ["features.1", "features.4"],
    "regnet_x_400mf": ["trunk_output.block1", "trunk_output.block3.block3-1"],
}


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_families_split_equal_the_model_and_cascade(name, make_head):
    torch.manual_seed(0)
    model = _randomise_bn(B.build_model(f"torchvision:{name}", 10)).eval()
    x = torch.randn(6, 3, 32, 32)
    bb = B.from_model(model, TORCHVISION[name], input_size=32)
    assert bb.branch_points == TORCHVISION[name] and bb.n_classes == 10 and bb.mean == IMAGENET_MEAN
    assert not any(p.requires_grad for p in model.parameters())
    _same_as_model(bb, model, x)
    _check_cascades(bb, x, make_head)
    by_flops = B.from_model(model, placement="flops", n_branches=2, input_size=32)
    assert by_flops.n_branches == 2 and by_flops.branch_points != TORCHVISION[name]
    _same_as_model(by_flops, model, x)
    # the source state dict is the model's own (keys and values), so run directories can save and reload it
    sd = by_flops.source_state_dict()
    assert set(sd) <= set(model.state_dict()) and all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())


def test_flops_placement_is_near_equal_fractions_and_names_are_checked():
    from calexnet_fast.flops import segment_flops

    model = torchvision.models.resnet18(num_classes=10)
    bb = B.from_model(model, input_size=32)  # default: 3 branch points placed by FLOPs
    seg = segment_flops(bb)
    cum = np.cumsum(seg[:-1]) / sum(seg)
    assert bb.n_branches == 3 and np.all(np.abs(cum - [0.25, 0.5, 0.75]) < 0.13), cum
    with pytest.raises(ValueError, match=r"'layer9' is not a branch point of ResNet; valid names: \[.*'layer1.0'"):
        B.from_model(model, ["layer9"], input_size=32)
    with pytest.raises(ValueError, match="distinct names in forward order"):
        B.from_model(model, ["layer2", "layer1"], input_size=32)
    with pytest.raises(ValueError, match="n_branches: expected 1..7"):  # the blocks but the last
        B.from_model(model, placement="flops", n_branches=8, input_size=32)
    with pytest.raises(ValueError, match=r"input_size: expected \(H, W\) \(the model ResNet declares none\)"):
        B.from_model(model, ["layer1"])
    with pytest.raises(ValueError, match="expected its forward to return logits"):
        B.from_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)), input_size=16)
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no block boundary with a 4-D feature map .* name branch_points instead"):
        B.from_model(tiny, input_size=8)
    assert B.from_model(tiny, ["0"], input_size=8).branch_shapes == [(4, 6, 6)]


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnets_through_the_generic_splitter(shortcut, make_head):
    torch.manual_seed(1)
    model = _randomise_bn(B.CifarResNet(20, 10, shortcut=shortcut)).eval()
    x = torch.randn(6, 3, 32, 32)
    bb = B.from_model(model, ["layer1", "layer2.1"], input_size=32)
    _same_as_model(bb, model, x)
    own = B.cifar_resnet(20, checkpoint=model.state_dict(), branch_points=["layer1", "layer2.1"], shortcut=shortcut)
    with torch.no_grad():
        for a, b in zip(bb.features(x)[0], own.features(x)[0], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert own.source_state_dict().keys() == model.state_dict().keys()
    _check_cascades(bb, x, make_head)


USER_MODEL = '''
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    """Not a chain of its children: a skip from stem to body.1, pooling and flattening by functions."""

    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self, n_classes=10):
        super().__init__()
        self.stem = Block(3, 8)
        self.body = nn.ModuleList([Block(8, 8), Block(8, 8), Block(8, 16, 2), Block(16, 16)])
        self.head = nn.Linear(16, n_classes)
        self.unused = nn.Linear(3, 3)

    def forward(self, x, scale: float = 1.0):
        s = self.stem(x)
        x = self.body[1](self.body[0](s)) + s
        x = self.body[3](self.body[2](x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1)) * scale


def make(n_classes=10):
    return Net(n_classes)


def make_fine():
    return Net(100)


def not_a_model():
    return 3
'''


@pytest.fixture
def user_file(tmp_path) -> Path:
    path = tmp_path / "user_model.py"
    path.write_text(USER_MODEL)
    return path


def test_a_user_model_from_a_file_takes_the_fx_path(user_file, make_head):
    torch.manual_seed(2)
    model = _randomise_bn(B.build_model(f"{user_file}:make", 5))
    x = torch.randn(6, 3, 16, 16)
    bb = B.from_model(model, ["stem", "body.2"], input_size=16)
    assert bb.mean == (0.5, 0.5, 0.5) and bb.std == (0.25, 0.25, 0.25)  # the statistics the model declares
    assert all(hasattr(s[0], "graph") for s in bb.stages)  # torch.fx stages
    _same_as_model(bb, model.eval(), x)
    _check_cascades(bb, x, make_head)
    placed = B.from_model(model, n_branches=2, placement="flops", input_size=16)
    assert placed.branch_points == ["stem", "body.2"]  # the only block boundaries outside the skip
    # a cut inside the skip connection names what crosses it
    for inside in ("body.0", "body.1"):
        with pytest.raises(ValueError, match=rf"cannot cut Net after '{inside}': besides its output, 1 value.*'stem'"):
            B.from_model(model, [inside], input_size=16)
    with pytest.raises(ValueError, match=r"'unused' is not a module that Net's forward calls"):
        B.from_model(model, ["unused"], input_size=16)
    with pytest.raises(ValueError, match="has no function 'nope'.*'make'"):
        B.build_model(f"{user_file}:nope", 5)
    with pytest.raises(ValueError, match=r"not_a_model\(\) returned a int, expected an nn.Module"):
        B.build_model(f"{user_file}:not_a_model", 5)
    with pytest.raises(ValueError, match="the model file .* does not exist"):
        B.build_model(f"{user_file.parent / 'gone.py'}:make", 5)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:  # data-dependent control flow
            x = x * 2
        return self.fc(self.b(x).mean((2, 3)))


def test_an_untraceable_non_chain_model_is_explained():
    with pytest.raises(ValueError, match="_Untraceable is not a chain of its modules and torch.fx cannot trace"):
        B.from_model(_Untraceable(), ["a"], input_size=8)


TIMM = {"resnet10t": ["layer1", "layer3.0"], "mobilenetv3_small_050": ["blocks.1", "blocks.3"]}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_models(name, make_head):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install 'calexnet_fast[timm]')")
    torch.manual_seed(3)
    model = _randomise_bn(B.build_model(f"timm:{name}", 7)).eval()
    assert B.declared_input(model)["input_size"] == tuple(model.pretrained_cfg["input_size"][1:])
    x = torch.randn(4, 3, 32, 32)
    bb = B.from_model(model, TIMM[name], input_size=32)
    assert bb.mean == tuple(model.pretrained_cfg["mean"]) and bb.n_classes == 7
    _same_as_model(bb, model, x)
    _check_cascades(bb, x, make_head)
    _same_as_model(B.from_model(model, n_branches=2, placement="flops", input_size=32), model, x)
    with pytest.raises(ValueError, match="is not a timm model"):
        B.build_model("timm:resnet10tt", 7)
    assert timm.is_model(name)


def test_timm_missing_is_explained(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm":
            raise ImportError("no timm")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ValueError, match=r"needs the timm package.*calexnet_fast\[timm\]"):
        B.build_model("timm:resnet18", 10)


# --------------------------------------------------------------------------------------------------
# weights from local files
# --------------------------------------------------------------------------------------------------


def test_weights_files_wrappers_and_prefixes(tmp_path):
    torch.manual_seed(4)
    src = _randomise_bn(B.CifarResNet(8, 4, shortcut="B"))
    sd = src.state_dict()
    variants = {
        "plain.safetensors": None,
        "module.pt": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
        "model.pth": {"model": {f"model.{k}": v for k, v in sd.items()}},
        "compiled.pt": {f"_orig_mod.{k}": v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
    }
    for name, obj in variants.items():
        path = tmp_path / name
        if obj is None:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        else:
            torch.save(obj, path)
        dst = B.load_weights(B.CifarResNet(8, 4, shortcut="B"), path)
        for k, v in dst.state_dict().items():
            assert k.endswith("num_batches_tracked") or torch.equal(v, sd[k]), (name, k)


def test_option_a_and_option_b_checkpoints_say_what_differs_and_what_fits(tmp_path):
    torch.manual_seed(5)
    b56 = _randomise_bn(B.CifarResNet(56, 100, shortcut="B")).eval()  # pytorch-cifar-models layout: fc, downsample
    path = tmp_path / "cifar100_resnet56.pt"
    torch.save(b56.state_dict(), path)
    assert "fc.weight" in b56.state_dict() and "layer2.0.downsample.0.weight" in b56.state_dict()
    with pytest.raises(RuntimeError) as e:
        B.build_backbone(B.BackboneSpec(arch="cifar_resnet56", n_classes=100, checkpoint=str(path)))
    msg = str(e.value)
    assert "does not fit cifar_resnet56 (9 blocks per stage, option-A shortcuts, 100 classes)" in msg
    assert "unexpected keys [layer2.0.downsample.*, layer3.0.downsample.*] (12 in all)" in msg
    assert msg.endswith("the weights look like cifar_resnet56_b (option-B 1x1 conv + BN shortcuts, 100 classes)")
    with pytest.raises(RuntimeError, match=r"shape mismatches \[fc.weight: expected \[10, 64\], got \[100, 64\]"):
        B.cifar_resnet(56, n_classes=10, checkpoint=path, shortcut="B")
    # the architecture it suggests loads it, and equals the plain model
    bb = B.build_backbone(B.BackboneSpec(arch="cifar_resnet56_b", n_classes=100, checkpoint=str(path), n_branches=3))
    _same_as_model(bb, b56, torch.randn(4, 3, 32, 32))
    # and the other way round: an akamaster-style option-A checkpoint into the option-B network
    a20 = {f"module.{k}": v for k, v in B.CifarResNet(20, 10).state_dict().items()}
    with pytest.raises(RuntimeError, match=r"missing keys \[layer2.0.downsample.\*, layer3.0.downsample.\*\]") as e:
        B.cifar_resnet(20, checkpoint={"state_dict": a20}, shortcut="B")
    assert str(e.value).endswith("the weights look like cifar_resnet20 (option-A shortcuts, 10 classes)")


def test_model_source_checkpoints_and_what_they_look_like(tmp_path):
    r34 = torchvision.models.resnet34(num_classes=10)
    path = tmp_path / "r34.safetensors"
    save_file({k: v.contiguous() for k, v in r34.state_dict().items()}, str(path))
    spec = B.BackboneSpec(arch="torchvision:resnet18", n_classes=10, checkpoint=str(path), input_size=32)
    with pytest.raises(RuntimeError) as e:
        B.build_backbone(spec)
    assert "does not fit torchvision:resnet18: unexpected keys [layer1.2.*, layer2.2.*" in str(e.value)
    assert "the weights look like resnet34 (imagenet stem, 10 classes; torchvision:resnet34" in str(e.value)
    spec.arch = "torchvision:resnet34"
    _same_as_model(B.build_backbone(spec), r34.eval(), torch.randn(2, 3, 32, 32))
    assert B.describe_state_dict(B.trainable_backbone("resnet18", 10, "cifar").state_dict()).startswith(
        "resnet18 (cifar stem, 10 classes"
    )
    assert B.describe_state_dict({"w": torch.zeros(1)}) is None


def test_a_run_checkpoint_that_changed_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(B.CifarResNet(8, 3).state_dict(), str(path))
    spec = B.BackboneSpec(
        arch="cifar_resnet8", n_classes=3, checkpoint=str(path), checkpoint_sha256=B.file_sha256(path)
    )
    B.build_backbone(spec)
    save_file(B.CifarResNet(8, 3).state_dict(), str(path))
    with pytest.raises(ValueError, match=r"checkpoint: .*w.safetensors' changed since the run was made"):
        B.build_backbone(spec)


# --------------------------------------------------------------------------------------------------
# class maps, CIFAR-100 fine labels
# --------------------------------------------------------------------------------------------------


def test_class_map_sums_probabilities_per_label_and_scripts(make_head):
    cmap = [0, 2, 1, 2, 0, 1]
    z = torch.randn(5, 6) * 4
    out = B.ClassMap(cmap)(z)
    p = z.softmax(1)
    want = torch.stack([p[:, [0, 4]].sum(1), p[:, [2, 5]].sum(1), p[:, [1, 3]].sum(1)], 1)
    torch.testing.assert_close(out.exp(), want)
    torch.testing.assert_close(out.softmax(1), want)  # log-probabilities are logits of the summed probabilities
    torch.testing.assert_close(torch.jit.script(B.ClassMap(cmap))(z), out)
    assert B.ClassMap(cmap)(z.half()).dtype == torch.float16
    for bad, match in (([0, 2], "labels \\[1\\] have none"), ([-1, 0], "labels >= 0"), ([[0]], "1-D list")):
        with pytest.raises(ValueError, match=match):
            B.ClassMap(bad)
    fine = B.cifar_resnet(8, n_classes=6, branch_points=["layer1"], input_size=16)
    coarse = B.with_class_map(fine, cmap)
    assert coarse.n_classes == 3 and coarse.branch_points == ["layer1"]
    x = torch.randn(6, 3, 16, 16)
    torch.testing.assert_close(coarse(x), B.ClassMap(cmap)(fine(x)))
    assert coarse.source_state_dict().keys() == fine.source_state_dict().keys()
    with pytest.raises(ValueError, match="class_map: expected 6 entries"):
        B.with_class_map(fine, [0, 1])
    _check_cascades(coarse, torch.randn(8, 3, 16, 16), make_head)


def _write_cifar100(root: Path, n_train: int = 300, n_test: int = 50) -> Path:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)

    def dump(name, obj):
        with open(d / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    names = {b"fine_label_names": [f"f{i}".encode() for i in range(100)]}
    dump("meta", {**names, b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    for split, n in (("train", n_train), ("test", n_test)):
        fine = [(j * 7) % 100 for j in range(n)]
        x = np.random.default_rng(n).integers(0, 256, size=(n, 3072), dtype=np.uint8)
        dump(split, {b"data": x, b"fine_labels": fine, b"coarse_labels": [(f * 3) % 20 for f in fine]})
    return d


def test_cifar100_fine_labels_and_the_fine_to_coarse_map(tmp_path, user_file):
    root = _write_cifar100(tmp_path)
    coarse = data.load_dataset("cifar100-coarse", root)
    assert coarse.n_classes == 20 and len(coarse.fine_classes) == 100
    assert coarse.fine_to_coarse == [(f * 3) % 20 for f in range(100)]
    assert len(coarse.val) == 60  # no --val-size: 20 % of a small training split
    for split in (coarse.train, coarse.val, coarse.test):  # the fine labels follow every subset
        assert torch.equal(torch.tensor(coarse.fine_to_coarse)[split.fine_labels], split.labels)
    fine = data.load_dataset("cifar100", root)
    assert torch.equal(fine.val.labels, coarse.val.fine_labels) and fine.fine_to_coarse == coarse.fine_to_coarse
    # a backbone on the 100 fine classes serves the 20 coarse labels through the dataset's map
    opts = Namespace(dataset="cifar100-coarse", data_dir=str(root), val_size=None, split_seed=0, image_size=None)
    opts.__dict__.update(synthetic_size=(1, 1, 1), synthetic_classes=2, backbone=f"{user_file}:make_fine")
    opts.__dict__.update(checkpoint=None, backbone_run=None, pretrained_dir=None, random_init=True, stem="cifar")
    opts.__dict__.update(branch_points=["stem"], n_branches=None, class_map=None)
    with pytest.raises(RunError, match="100 classes, dataset cifar100-coarse has 20; .* add --class-map dataset"):
        data_and_backbone(opts)
    opts.class_map = "dataset"
    splits, _, spec, bb = data_and_backbone(opts)
    assert bb.n_classes == 20 and spec.n_classes == 100 and spec.class_map == coarse.fine_to_coarse
    assert B.build_backbone(spec).n_classes == 20  # the run rebuilds it with the map
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"class_map": coarse.fine_to_coarse}))
    opts.class_map = str(cmap)
    assert data_and_backbone(opts).spec.class_map == coarse.fine_to_coarse
    cmap.write_text('"nope"')
    with pytest.raises(RunError, match="expected a JSON list of ints"):
        data_and_backbone(opts)


# --------------------------------------------------------------------------------------------------
# the backbone's normalisation and input size; small datasets
# --------------------------------------------------------------------------------------------------


def _options(backbone: str, **kw) -> Namespace:
    base = dict(dataset="synthetic", data_dir=None, val_size=None, split_seed=0, image_size=None)
    base.update(synthetic_size=(60, 40, 20), synthetic_classes=4, backbone=backbone, checkpoint=None)
    base.update(backbone_run=None, pretrained_dir=None, random_init=True, stem="cifar", branch_points=None)
    base.update(n_branches=2, mean=None, std=None, class_map=None)
    base.update(kw)
    return Namespace(**base)


def test_the_backbone_owns_its_normalisation_and_input_size(tmp_path, caplog):
    model_file = tmp_path / "declared.py"
    model_file.write_text(
        textwrap.dedent(
            """
            import torchvision

            def make(num_classes):
                m = torchvision.models.mobilenet_v3_small(num_classes=num_classes)
                m.mean, m.std, m.input_size = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 24
                return m
            """
        )
    )
    with caplog.at_level(logging.WARNING, logger="calexnet_fast"):
        splits, dataset, spec, bb = data_and_backbone(_options(f"{model_file}:make"))
    assert bb.input_size == (24, 24) and spec.input_size == 24 and dataset["image_size"] == 24
    assert splits.train[0][0].shape == (3, 24, 24)  # the data takes the backbone's input size
    assert spec.mean == (0.0, 0.0, 0.0) and splits.val.normalization.std == (1.0, 1.0, 1.0)
    assert "statistics look far from the backbone's input normalisation" in caplog.text  # std 0.3 vs 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="calexnet_fast"):
        splits, dataset, spec, bb = data_and_backbone(
            _options(f"{model_file}:make", mean=[0.5, 0.5, 0.5], std=[0.3, 0.3, 0.3], image_size=16)
        )
    assert spec.mean == (0.5, 0.5, 0.5) and bb.std == (0.3, 0.3, 0.3) and bb.input_size == (16, 16)
    assert splits.test.normalization.mean == (0.5, 0.5, 0.5) and dataset["image_size"] == 16
    assert "statistics look far" not in caplog.text
    # the rule itself
    norm = Normalization((0.5,) * 3, (0.25,) * 3)
    assert statistics_mismatch(norm, (0.45, 0.5, 0.55), (0.2, 0.25, 0.3)) is None
    assert "channel 2: mean 0.900" in statistics_mismatch(norm, (0.5, 0.5, 0.9), (0.25, 0.25, 0.25))


def test_small_dataset_defaults():
    assert data.default_val_size(50_000) == 5000 and data.default_val_size(1117) == 223
    assert data.default_min_support(5000) == 20 and data.default_min_support(2000) == 8
    assert data.default_min_support(223) == 3 and data.default_min_support(100_000) == 20


# --------------------------------------------------------------------------------------------------
# the command line, end to end, on a user model file with a checkpoint
# --------------------------------------------------------------------------------------------------

SYN = ["--dataset", "synthetic", "--synthetic-size", "400", "200", "200", "--synthetic-classes", "4"]
SYN += ["--image-size", "16"]
FAST = ["--batch-size", "64", "--head-dim", "8", "--n-prototypes", "4", "--lr", "3e-3", "--threads", "1"]


def _pretrain(model: nn.Module, norm: Normalization, steps: int = 60) -> None:
    """A few SGD steps on the synthetic images the CLI will generate (same seed), so that exits vary."""
    splits = data.synthetic_dataset(400, 200, 200, n_classes=4, image_size=16, normalization=norm)
    x = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    y = splits.train.labels
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_cli_on_a_user_model_file_with_a_checkpoint(user_file, tmp_path):
    torch.manual_seed(6)
    model = B.build_model(f"{user_file}:make", 4)
    _pretrain(model, Normalization(model.mean, model.std))
    ckpt = tmp_path / "user.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    run = tmp_path / "run"
    backbone = ["--backbone", f"{user_file}:make", "--checkpoint", str(ckpt), "--branch-points", "stem", "body.2"]
    assert cli.main(["train", *SYN, *backbone, *FAST, "--epochs", "3", "--out", str(run), "--quiet"]) == 0
    config = json.loads((run / "config.json").read_text())
    rec = config["backbone"]
    assert rec["arch"] == f"{user_file.resolve()}:make" and rec["file_sha256"] == B.file_sha256(user_file)
    assert rec["checkpoint_sha256"] == B.file_sha256(ckpt) and rec["branch_points"] == ["stem", "body.2"]
    assert rec["mean"] == [0.5] * 3 and rec["std"] == [0.25] * 3 and rec["input_size"] == 16
    assert config["recipe"]["min_support"] == data.default_min_support(200) == 3  # scaled to the small val split
    assert cli.main(["calibrate", "--run", str(run), "--margins", "0:0.4:5", "--quiet"]) == 0
    assert cli.main(["evaluate", "--run", str(run), "--quiet"]) == 0
    timing = ["--batch-size", "50", "--repeats", "1", "--warmup", "0", "--threads", "1", "--modes", "batch"]
    assert cli.main(["measure", "--run", str(run), "--margins", "all", *timing, "--quiet"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["backbone_accuracy"] > 0.5  # the checkpoint was loaded (chance is 0.25)
    points = json.loads((run / "speed.json").read_text())["runs"][0]["points"]
    assert all(p["mismatches"] == 0 for p in points)  # the real cascade == the simulated evaluation
    assert max(sum(p["exit_fractions"][:-1]) for p in points) > 0.2
    cascade = Cascade.from_run(run, margin=0.2)
    assert cascade.branch_points == ["stem", "body.2"]
    x = torch.randn(16, 3, 16, 16)
    assert torch.equal(cascade(x).exit_index, cascade.decide(cascade.simulate(x)).exit_index)
    # a later command says clearly when the model file changed or moved, or the weights changed
    original = user_file.read_text()
    user_file.write_text(original + "\n# edited\n")
    with pytest.raises(RunError, match="user_model.py' changed since the run was made: its SHA-256 is"):
        Cascade.from_run(run)
    user_file.rename(tmp_path / "elsewhere.py")
    with pytest.raises(RunError, match="user_model.py' has been moved or deleted since the run was made"):
        Run(run).load_backbone()
    (tmp_path / "elsewhere.py").rename(user_file)
    user_file.write_text(original)
    torch.save(model.state_dict(), ckpt)
    with pytest.raises(RunError, match="user.pt' changed since the run was made"):
        Run(run).load_backbone()


def test_cli_torchvision_model_with_random_init(tmp_path):
    run = tmp_path / "run"
    argv = ["train", *SYN, "--backbone", "torchvision:mobilenet_v3_small", "--random-init", "--n-branches", "2"]
    assert cli.main([*argv, *FAST, "--epochs", "1", "--out", str(run), "--quiet"]) == 0
    rec = json.loads((run / "config.json").read_text())["backbone"]
    assert rec["checkpoint"] == "backbone.safetensors" and len(rec["branch_points"]) == 2
    assert cli.main(["calibrate", "--run", str(run), "--margins", "0:0.2:3", "--quiet"]) == 0
    cascade = Cascade.from_run(run, margin=0.1)  # the exact random backbone it was trained on
    assert cascade.branch_points == rec["branch_points"]
    with pytest.raises(SystemExit, match="torchvision:mobilenet_v4 is not a torchvision classification model"):
        cli.main(["train", *SYN, "--backbone", "torchvision:mobilenet_v4", "--random-init", "--out", str(run)])
    with pytest.raises(SystemExit, match="no weights for --backbone torchvision:resnet18: pass --checkpoint FILE"):
        cli.main(["train", *SYN, "--backbone", "torchvision:resnet18", "--out", str(tmp_path / "r")])
