"""ComfyUI ToDo: token downsampling for fast high-resolution generation.

ComfyUI loads this folder from ``custom_nodes/`` and calls ``comfy_entrypoint``.
Imported anywhere else (pytest collecting ``tests/``, tools reading the
package), the ComfyUI layer is skipped so that ``todo_core`` stays usable.
"""

try:
    import comfy_api.latest  # noqa: F401  (only present inside ComfyUI)
except ImportError:
    __all__: list[str] = []
else:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
