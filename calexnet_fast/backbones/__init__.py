"""Frozen CNN backbones split into stages at branch points (docs/design.md §1, §2).

A :class:`StagedBackbone` holds the stages ``S_0 .. S_K`` of a frozen network: branch ``k`` (1-based) reads
the feature map ``f_k`` produced by stage ``k-1``, and the last stage ``S_K`` ends with the backbone's own
pooling and classifier and returns logits. The cascades run the stages one by one on a shrinking batch.

Modules:

* :mod:`.staged`: :class:`FrozenStage` and :class:`StagedBackbone`.
* :mod:`.placement`: cutting a list of named units at branch points, or at ``placement="flops"``.
* :mod:`.torchvision`: :func:`resnet18`, :func:`resnet50` and :func:`from_torchvision`, torchvision ResNets
  with the ImageNet stem or the usual CIFAR stem (3x3 stride-1 ``conv1``, no max-pool).
* :mod:`.cifar`: :func:`cifar_resnet`, the CIFAR ResNet-20/32/44/56 of He et al. (option-A shortcuts, the
  checkpoints of ``pretrained/akamaster_resnet_cifar10``; or option-B 1x1 conv + BN shortcuts).
* :mod:`.generic`: :func:`from_model`, any classifier ``nn.Module`` split at named modules or by FLOPs (its
  module tree where the forward is a chain, :mod:`.fxsplit` and ``torch.fx`` where it is not).
* :mod:`.custom`: :func:`from_stages`, any model given as a list of stages plus a final classifier.
* :mod:`.classmap`: :func:`with_class_map`, a backbone whose classes are finer than the labels.
* :mod:`.checkpoints`: reading weight files (``torch.load(weights_only=True)`` or safetensors), fitting their
  keys (``module.`` / ``model.`` prefixes) and explaining a mismatch; :func:`load_weights`.
* :mod:`.sources`: models by source: ``torchvision:<name>``, ``timm:<name>``, ``path/to/file.py:factory``.
* :mod:`.spec`: :class:`BackboneSpec` and :func:`build_backbone`, backbones by name (what run directories
  store).
* :mod:`.inference`: :func:`inference_form`, the inference form of frozen stages (BatchNorm folded into the
  convolutions, :func:`fold_batchnorm`; max pools where the CPU kernel is fast), for a backbone or a cascade.

Nothing here downloads weights.
"""

from .checkpoints import describe_state_dict, load_state_dict_file, load_weights
from .cifar import (
    CIFAR_RESNET_DEPTHS,
    CifarResNet,
    cifar_resnet,
    find_pretrained_cifar_checkpoint,
    load_cifar_resnet_checkpoint,
)
from .classmap import ClassMap, with_class_map
from .custom import from_stages
from .generic import declared_input, from_model
from .inference import InferenceMaxPool2d, fold_batchnorm, inference_form
from .sources import build_model, file_sha256, is_model_source
from .spec import TORCHVISION_ARCHS, BackboneSpec, build_backbone, cifar_depth, cifar_variant, trainable_backbone
from .staged import FrozenStage, StagedBackbone
from .torchvision import from_torchvision, resnet18, resnet50

__all__ = [
    "CIFAR_RESNET_DEPTHS",
    "TORCHVISION_ARCHS",
    "BackboneSpec",
    "InferenceMaxPool2d",
    "CifarResNet",
    "ClassMap",
    "FrozenStage",
    "StagedBackbone",
    "build_backbone",
    "build_model",
    "cifar_depth",
    "cifar_resnet",
    "cifar_variant",
    "declared_input",
    "describe_state_dict",
    "file_sha256",
    "find_pretrained_cifar_checkpoint",
    "fold_batchnorm",
    "from_model",
    "from_stages",
    "from_torchvision",
    "inference_form",
    "is_model_source",
    "load_cifar_resnet_checkpoint",
    "load_state_dict_file",
    "load_weights",
    "resnet18",
    "resnet50",
    "trainable_backbone",
    "with_class_map",
]
