"""calexnet_fast: early-exit cascades on frozen CNN backbones that really skip work at batch size > 1."""

from . import ops  # loads the C++ op libraries and registers torch.ops.calexnet_fast.*
from ._version import __version__
from .cascades import Cascade, CascadeOutput, ReferenceCascade

__all__ = ["Cascade", "CascadeOutput", "ReferenceCascade", "__version__", "ops"]
