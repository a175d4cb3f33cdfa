"""ToDo (token downsampling) for diffusion UNets, in pure torch.

Nothing in this package imports ComfyUI: the node layer (``nodes.py``) builds a
:class:`ToDoConfig` from its inputs and registers a :class:`ToDoAttn1Patch`.
"""

from .choices import ConfigError
from .config import CONFIGURABLE_DEPTHS, FactorMode, ToDoConfig, native_resolution_for
from .downsample import DownsampleMethod, downsample_tokens, output_side, output_tokens
from .grid import TokenGrid, ceil_side, resolve_grid
from .patch import ToDoAttn1Patch

__all__ = [
    "CONFIGURABLE_DEPTHS",
    "ConfigError",
    "DownsampleMethod",
    "FactorMode",
    "ToDoAttn1Patch",
    "ToDoConfig",
    "TokenGrid",
    "ceil_side",
    "downsample_tokens",
    "native_resolution_for",
    "output_side",
    "output_tokens",
    "resolve_grid",
]
