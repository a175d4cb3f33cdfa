"""Every attention-mask form a DiT passes survives ToDo's key reduction and mass correction.

ComfyUI's backends read a mask's leading axes by count: ``[Lq, Lk]`` is shared,
``[B, Lq, Lk]`` is per batch item (the head axis is added), ``[B, 1 or H, Lq,
Lk]`` is per item and head. Flux gets a ``[B, Lq, Lk]`` float16 mask from
``StyleModelApply`` with ``strength_type = attn_bias`` (Redux). Each form is
checked against the exact oracle: attention over the full sequence in which
every key, value and mask column of a group is replaced by the group's kept one.
"""

from __future__ import annotations

import math

import pytest
import torch
from comfy_support import apply_node, import_comfyui

from todo_core.dit import SequenceLayout, reduce_keys, select_keys

LAYOUT = SequenceLayout(prefix=5, frames=1, height=5, width=7, suffix=2)
"""Text first, an image grid that factor 2 divides in neither side, reference tokens after it."""
BATCH, HEADS, DIM = 3, 2, 8
"""Batch 3 against 2 heads: a mask read with the wrong leading axes fails to broadcast."""
MASK_FORMS = {
    "Lk": (LAYOUT.tokens,),
    "Lq,Lk": (LAYOUT.tokens, LAYOUT.tokens),
    "B,Lq,Lk": (BATCH, LAYOUT.tokens, LAYOUT.tokens),
    "B,1,Lq,Lk": (BATCH, 1, LAYOUT.tokens, LAYOUT.tokens),
    "B,H,Lq,Lk": (BATCH, HEADS, LAYOUT.tokens, LAYOUT.tokens),
    "1,1,1,Lk": (1, 1, 1, LAYOUT.tokens),
}


def as_comfyui_backends_read_it(mask: torch.Tensor) -> torch.Tensor:
    """A mask broadcast to ``[B or 1, H or 1, Lq, Lk]``, the way ComfyUI's PyTorch backend unsqueezes it."""
    if mask.ndim == 1:
        return mask.view(1, 1, 1, -1)
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return mask


def random_mask(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A mask that really differs per batch item, head and query, with some keys masked out (never all)."""
    if dtype == torch.bool:
        keep = torch.rand(shape, generator=generator) > 0.25
        keep[..., 0] = True  # a text key every query may attend to
        return keep
    bias = torch.randn(shape, generator=generator)
    blocked = torch.rand(shape, generator=generator) < 0.1
    blocked[..., 0] = False
    return bias.masked_fill(blocked, -math.inf).to(dtype)


def group_replaced_positions(layout: SequenceLayout, factor: float) -> torch.Tensor:
    """For every key position: the position of the key its group keeps (an explicit walk over the grid)."""
    selection = select_keys(layout, factor, torch.device("cpu"))
    kept = set(selection.indices.tolist())
    positions = []
    for position in range(layout.tokens):
        image = position - layout.prefix
        if not 0 <= image < layout.image_tokens:
            positions.append(position)
            continue
        row, col = divmod(image, layout.width)
        # the kept row / column of a group is the last kept one at or before it
        kept_row = max(r for r in range(row + 1) if layout.prefix + r * layout.width in kept)
        kept_col = max(c for c in range(col + 1) if layout.prefix + c in kept)
        positions.append(layout.prefix + kept_row * layout.width + kept_col)
    return torch.tensor(positions)


def oracle(q, k, v, mask, positions):
    """Exact attention over the full sequence with group-replaced keys, values and mask columns."""
    full_mask = None if mask is None else as_comfyui_backends_read_it(mask)[..., positions]
    if full_mask is not None and full_mask.dtype != torch.bool:
        full_mask = full_mask.to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(q, k[:, :, positions], v[:, :, positions], full_mask)


def qkv(dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(BATCH, HEADS, LAYOUT.tokens, DIM, generator=generator).to(dtype) for _ in range(3))


@pytest.mark.parametrize("form", list(MASK_FORMS))
@pytest.mark.parametrize(
    "mask_dtype", [torch.float64, torch.float32, torch.float16, torch.bool], ids=["fp64", "fp32", "fp16", "bool"]
)
def test_every_mask_form_equals_the_oracle(form, mask_dtype):
    """Queries in the mask's precision (ComfyUI's models keep them alike), or float64 beside a boolean mask."""
    compute_dtype = torch.float64 if mask_dtype == torch.bool else mask_dtype
    generator = torch.Generator().manual_seed(1)
    mask = random_mask(MASK_FORMS[form], mask_dtype, generator)
    q, k, v = qkv(compute_dtype)
    k_small, v_small, reduced = reduce_keys(k, v, mask, LAYOUT, 2, sequence_dim=2)
    assert reduced.ndim == mask.ndim, "the backends read the leading axes by count"
    assert reduced.shape[:-1] == mask.shape[:-1] and reduced.shape[-1] == k_small.shape[2]
    if mask_dtype != torch.bool:
        assert reduced.dtype == mask_dtype, "SDPA refuses a mask of another float type than its queries"
    out = torch.nn.functional.scaled_dot_product_attention(q, k_small, v_small, as_comfyui_backends_read_it(reduced))
    positions = group_replaced_positions(LAYOUT, 2)
    if compute_dtype == torch.float16:  # the oracle in float32, from the same float16 inputs
        expected = oracle(q.float(), k.float(), v.float(), mask.float(), positions)
        torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=2e-3)
    else:
        tolerance = 1e-10 if compute_dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out, oracle(q, k, v, mask, positions), rtol=tolerance, atol=tolerance)


def test_a_mask_broadcast_over_the_keys_is_kept_as_it_is():
    _q, k, v = qkv(torch.float64)
    mask = torch.randn(BATCH, 1, LAYOUT.tokens, 1, dtype=torch.float64)  # a per-query bias: cancels, but legal
    k_small, _, reduced = reduce_keys(k, v, mask, LAYOUT, 2, sequence_dim=2)
    assert reduced.shape == (BATCH, 1, LAYOUT.tokens, k_small.shape[2])


@pytest.mark.comfyui
@pytest.mark.parametrize("backend", ["attention_basic", "attention_sub_quad", "attention_split", "attention_pytorch"])
@pytest.mark.parametrize("form", ["Lq,Lk", "B,Lq,Lk", "B,1,Lq,Lk", "B,H,Lq,Lk"])
@pytest.mark.parametrize("batch", [BATCH, HEADS], ids=["batch3-heads2", "batch-equals-heads"])
def test_every_comfyui_backend_reads_the_reduced_mask_as_the_full_one(backend, form, batch):
    """ComfyUI's own backends with ToDo's override: batch 3 must not crash, batch = heads must not mix axes."""
    import_comfyui()
    import comfy.ldm.modules.attention as attention_module

    from todo_core import ToDoConfig
    from todo_core.dit import DIT_FAMILIES, LATENT_INFO_KEY, BlockSelection, LatentInfo, ToDoAttentionOverride

    shape = tuple(batch if size == BATCH else size for size in MASK_FORMS[form])
    generator = torch.Generator().manual_seed(2)
    mask = random_mask(shape, torch.float32, generator)
    q, k, v = (t[:batch].float() for t in qkv(torch.float32))
    expected = oracle(q, k, v, mask, group_replaced_positions(LAYOUT, 2)).transpose(1, 2).reshape(batch, -1, 16)
    latent = LatentInfo(1, 10, 14, LAYOUT.prefix)  # a 5 x 7 token grid after 5 text tokens, 2 tokens after it
    override = ToDoAttentionOverride(
        ToDoConfig.create(mode="manual", depth_1_factor=2), DIT_FAMILIES["flux"], BlockSelection.parse("all")
    )
    out = override(
        getattr(attention_module, backend),
        q,
        k,
        v,
        HEADS,
        mask=mask,
        skip_reshape=True,
        transformer_options={LATENT_INFO_KEY: latent},
    )
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


class _ImageTokens(torch.nn.Module):
    """A stand-in Redux encoder: maps vision features to 4 text-width tokens."""

    def __init__(self, width: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.project = torch.nn.Linear(16, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.project(hidden)


@pytest.mark.comfyui
def test_flux_with_redux_attn_bias_at_batch_three_equals_batch_one(node):
    """StyleModelApply's attn_bias gives Flux a [B, Lq, Lk] float16 mask; batch 3 once crashed on it."""
    import comfy.sample
    import comfy.sd
    from dit_support import CONTEXT_DIM, conditioning, latent_shape, tiny_dit, with_probe

    from nodes import StyleModelApply

    flux = tiny_dit("flux")
    style_model = comfy.sd.StyleModel(_ImageTokens(CONTEXT_DIM))
    vision = type("ClipVisionOutput", (), {"last_hidden_state": torch.randn(1, 4, 16)})()
    probed, probe = with_probe(flux)
    patched = apply_node(node, probed, mode="manual", depth_1_factor=2.0)

    def render(model, batch: int) -> torch.Tensor:
        positive, negative = conditioning(model, seed=3)
        (positive,) = StyleModelApply().apply_stylemodel(positive, style_model, vision, 0.5, "attn_bias")
        shape = latent_shape(model, 1, 18, 26)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(4)).repeat(batch, 1, 1, 1)
        latent = torch.zeros(noise.shape)
        return comfy.sample.sample(
            model, noise, 2, 1.0, "euler", "simple", positive, negative, latent, disable_pbar=True, seed=0
        )

    single = render(patched, 1)
    probe.reset()
    triple = render(patched, 3)
    masked = [c for c in probe.self_attention() if c.mask_shape is not None]
    assert masked and all(c.mask_shape[0] == 3 and len(c.mask_shape) == 3 for c in masked)
    assert all(c.kv_tokens < c.q_tokens for c in probe.self_attention()), "image keys reduced in every call"
    assert torch.isfinite(single).all()
    for item in range(3):
        torch.testing.assert_close(triple[item : item + 1], single, rtol=1e-5, atol=1e-5)
    plain = render(flux, 1)
    assert not torch.equal(plain, single), "ToDo acted on the masked render"
