"""Test-server custom node: lets ComfyUI's UNETLoader load the small DiT stand-ins of ``dit_stand_ins.py``.

Copied into the end-to-end test server's ``custom_nodes`` (never into a user's ComfyUI). It registers no node;
on import it wraps ``comfy.model_detection.model_config_from_unet`` so that a diffusion-model file whose
safetensors metadata carries ``comfyui_todo_stand_in`` gets ComfyUI's own detection (every width and block count
read from the tensor shapes), plus the values ComfyUI hard-codes for the full-size model (head counts, RoPE axes,
text width), and the config class the metadata names (ComfyUI matches Z-Image by its full width, 3840). Every
other file, and everything after this step (building, loading the weights, sampling), goes ComfyUI's usual way.
"""

from __future__ import annotations

import json
import logging

import comfy.model_detection
import comfy.supported_models

STAND_IN_KEY = "comfyui_todo_stand_in"
NODE_CLASS_MAPPINGS: dict = {}

_original = comfy.model_detection.model_config_from_unet


def model_config_from_unet(state_dict, unet_key_prefix, use_base_if_no_match=False, metadata=None):
    stand_in = (metadata or {}).get(STAND_IN_KEY)
    if stand_in is None:
        return _original(state_dict, unet_key_prefix, use_base_if_no_match, metadata=metadata)
    stand_in = json.loads(stand_in)
    unet_config = comfy.model_detection.detect_unet_config(state_dict, unet_key_prefix, metadata=metadata)
    unet_config.update(stand_in["unet_config"])
    logging.info("test stand-in: %s %s", stand_in["config_class"], unet_config)
    return getattr(comfy.supported_models, stand_in["config_class"])(unet_config)


comfy.model_detection.model_config_from_unet = model_config_from_unet
