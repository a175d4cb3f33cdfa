"""ComfyUI ToDo: token downsampling for fast high-resolution generation.

ComfyUI loads this folder from ``custom_nodes/``. The node is exported both
ways ComfyUI reads a pack: ``NODE_CLASS_MAPPINGS`` (which ComfyUI's loader
reads first, registering the node once, and which tools such as comfy-test
read alone) and the V3 ``comfy_entrypoint``. Imported anywhere else (pytest
collecting ``tests/``, tools reading the package), the ComfyUI layer is
skipped so that ``todo_core`` stays usable.
"""

try:
    import comfy_api.latest  # noqa: F401  (only present inside ComfyUI)
except ImportError:
    __all__: list[str] = []
else:
    from .nodes import ToDoModelPatch, comfy_entrypoint

    NODE_CLASS_MAPPINGS = {"ToDoModelPatch": ToDoModelPatch}
    NODE_DISPLAY_NAME_MAPPINGS = {"ToDoModelPatch": ToDoModelPatch.GET_SCHEMA().display_name}

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint"]
