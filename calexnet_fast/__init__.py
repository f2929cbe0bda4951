"""calexnet_fast: early-exit cascades on frozen CNN backbones that really skip work at batch size > 1."""

from . import ops  # noqa: F401  (loads the C++ op libraries and registers torch.ops.calexnet_fast.*)
from .cascade import CascadeOutput, ReferenceCascade  # noqa: F401
from .fast_cascade import Cascade  # noqa: F401

__version__ = "0.1.0"
