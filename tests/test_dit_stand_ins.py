"""The DiT stand-ins the end-to-end tests load under the workflows' file names are what they stand in for.

ComfyUI's detection reads every value of a stand-in's config from its tensor shapes except the few it hard-codes
for the full-size model; ComfyUI's own loader, with the test server's ``stand_in_loader`` in place, builds the real
model class; ToDo sees the family and member (native size, VAE scale) of the real model.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from comfy_server import STAND_IN_LOADER
from dit_stand_ins import DIT_STAND_INS, FLUX2, STAND_IN_KEY, WAN22_5B, Z_IMAGE, detected_config_agrees, write_dit

pytestmark = pytest.mark.comfyui
EXPECTED = {
    # stand-in: (ComfyUI model class, ToDo's member label, pixels per token, native size)
    Z_IMAGE.file_name: ("Lumina2", "Z-Image", (16, 16), (1024, 1024)),
    FLUX2.file_name: ("Flux2", "Flux.2", (16, 16), (1024, 1024)),
    WAN22_5B.file_name: ("WAN22", "Wan 2.2 TI2V 5B", (32, 32), (1280, 704)),
}


@pytest.fixture(scope="module")
def written(node, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit-stand-ins")
    return {s.file_name: write_dit(s, folder / s.file_name, seed) for seed, s in enumerate(DIT_STAND_INS)}


@pytest.fixture
def loader(monkeypatch):
    """The test server's custom node, imported here; the function it replaces is restored afterwards."""
    import comfy.model_detection

    monkeypatch.setattr(comfy.model_detection, "model_config_from_unet", comfy.model_detection.model_config_from_unet)
    spec = importlib.util.spec_from_file_location("todo_test_stand_in_loader", STAND_IN_LOADER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.STAND_IN_KEY == STAND_IN_KEY
    return module


@pytest.mark.parametrize("stand_in", DIT_STAND_INS, ids=lambda s: s.file_name)
def test_detection_reads_all_but_the_hard_coded_values_from_the_file(written, stand_in):
    assert detected_config_agrees(stand_in, written[stand_in.file_name]) == {}


@pytest.mark.parametrize("stand_in", DIT_STAND_INS, ids=lambda s: s.file_name)
def test_comfyui_loads_the_real_model_class_and_todo_sees_the_real_member(node, written, loader, stand_in):
    import comfy.model_detection
    import comfy.sd
    import comfy.utils

    model_class, label, pixels_per_token, native_size = EXPECTED[stand_in.file_name]
    patcher = comfy.sd.load_diffusion_model(str(written[stand_in.file_name]))
    assert type(patcher.model).__name__ == model_class
    assert type(patcher.model.model_config).__name__ == stand_in.config_class
    assert patcher.model.model_config.unet_config == {**patcher.model.model_config.unet_config, **json.loads(
        json.dumps({k: stand_in.unet_config[k] for k in stand_in.hard_coded}))}  # fmt: skip

    found = sys.modules[node.__module__].dit_family(patcher)
    assert (found.label, found.pixels_per_token, found.native_size) == (label, pixels_per_token, native_size)

    # ComfyUI's own matching, given the hard-coded values, picks the same config class, except for Z-Image,
    # which it matches by its full width (3840) and otherwise takes for Lumina 2.
    state, metadata = comfy.utils.load_torch_file(str(written[stand_in.file_name]), return_metadata=True)
    config = comfy.model_detection.detect_unet_config(state, "", metadata=metadata)
    config.update(json.loads(metadata[STAND_IN_KEY])["unet_config"])
    matched = type(comfy.model_detection.model_config_from_unet_config(config, state)).__name__
    assert matched == ("Lumina2" if stand_in is Z_IMAGE else stand_in.config_class)


def test_files_without_the_metadata_load_as_before(written, loader, tmp_path):
    """The loader only acts on the stand-ins: the same tensors without the metadata get ComfyUI's hard-coded 48
    heads, which a 64-wide model cannot have, and fail to load as they would without the loader."""
    import comfy.sd
    import comfy.utils
    from safetensors.torch import save_file

    state = comfy.utils.load_torch_file(str(written[FLUX2.file_name]))
    plain = tmp_path / "flux2-no-metadata.safetensors"
    save_file(state, str(plain))
    with pytest.raises(ValueError, match="must be divisible by num_heads 48"):
        comfy.sd.load_diffusion_model(str(plain))
