"""ToDo for diffusion transformers: image keys/values downsampled inside joint attention, mass-corrected.

A DiT block attends over one sequence that holds text tokens and the image's
patch tokens, in the order its family puts them (``families.py``: text first
for Flux, SD3, Z-Image; image first for HiDream, HunyuanVideo; image alone for
Wan, LTX). Keeping one key of every ``f x f`` group of image tokens
makes each kept key stand for the ``f**2`` keys it replaces, while every text
key still stands for itself: plain subsampling shifts softmax mass from the
image to the text. Adding ``log(group size)`` to the logit of each kept key
gives it the weight of its whole group, so that attention over the kept keys
equals attention over the full sequence in which every key and value of a group
is replaced by the group's kept key and value. Groups are the nearest-sampling
cells: ``f x f`` inside the grid, smaller at a border the factor does not
divide, each with its own exact bias.

Nothing here imports ComfyUI. The node layer records the latent shape, the
text length and the reference tokens per model call and registers :class:`ToDoAttentionOverride` as
ComfyUI's ``optimized_attention_override``.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .calibrate import (
    SAMPLED_ROWS,
    CallCalibration,
    DecisionKey,
    SampledQueries,
    calibrated_factor,
    call_calibration,
    sample_rows,
    stable_seed,
)
from .choices import ConfigError
from .config import FactorMode, ToDoConfig
from .downsample import nearest_indices, nearest_rows, output_side, output_tokens
from .families import (
    DIT_FAMILIES,
    DiTFamily,
    LatentInfo,
    SequenceLayout,
    holds_no_image,
    resolve_layout,
    token_grid,
)
from .memo import memoised
from .patch import in_sigma_window, traced_call, warn_once
from .routes import MASKLESS_BACKENDS, PASSES_MASKS_ATTRIBUTE, Route, attend_folded, attend_lse_merged, choose_route

__all__ = [  # the layout names come from families.py; code written against this module keeps working
    "CROSS_ATTENTION_KEY",
    "DIT_FAMILIES",
    "LATENT_INFO_KEY",
    "BlockSelection",
    "CrossAttentionFlag",
    "DiTFamily",
    "LatentInfo",
    "SequenceLayout",
    "ToDoAttentionOverride",
    "reduce_keys",
    "resolve_layout",
    "sdpa_attention",
    "select_keys",
]

LATENT_INFO_KEY = "todo_latent"
"""``transformer_options`` entry in which the node's model wrapper records a :class:`LatentInfo`."""
HOLDS_TODO_ATTRIBUTE = "holds_todo_override"
"""An attention override registered after ToDo's that calls ToDo's itself (it keeps the override it found and
calls it) says so with this attribute set to True: ToDo then does not put its own back around it."""
APPLIED_KEY = "todo_applied"
"""``transformer_options`` entry in the calls a ToDo override hands to another override it holds."""
CROSS_ATTENTION_KEY = "todo_cross_attention"
"""``transformer_options`` entry set in the calls of a family's cross-attention modules (see CrossAttentionFlag)."""


class CrossAttentionFlag:
    """A module's ``forward`` that flags its attention calls in ``transformer_options`` as not image self-attention.

    Registered by the node as an object patch (ComfyUI restores the original
    after sampling) on the modules a family names: cross-attention, audio
    streams, text encoders. Where the text is exactly as long as the video,
    shapes cannot tell Wan's cross-attention from its self-attention; the flag
    can. ``transformer_options`` may come as a keyword or in its position.
    """

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward
        try:
            names = list(inspect.signature(forward).parameters)
        except (TypeError, ValueError):
            names = []
        self.position = names.index("transformer_options") if "transformer_options" in names else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.position is not None and len(args) > self.position:
            args = list(args)
            args[self.position] = {**(args[self.position] or {}), CROSS_ATTENTION_KEY: True}
            return self.forward(*args, **kwargs)
        options = {**(kwargs.pop("transformer_options", None) or {}), CROSS_ATTENTION_KEY: True}
        return self.forward(*args, transformer_options=options, **kwargs)


def describe_grid(latent: LatentInfo, family: DiTFamily) -> str:
    frames, height, width = token_grid(latent, family.patch_size)
    return f"{frames}x{height}x{width} tokens with patch {'x'.join(map(str, family.patch_size))}"


def _group_sizes(side: int, factor: float) -> list[int]:
    """Sizes of the nearest-sampling groups along one side: each kept row stands for the rows up to the next."""
    starts = nearest_rows(side, factor)
    return [end - start for start, end in zip(starts, [*starts[1:], side], strict=True)]


@dataclass(frozen=True)
class KeySelection:
    """The keys ToDo keeps in one layout, and the log of how many keys each stands for."""

    indices: torch.Tensor
    """Positions of the kept keys in the full sequence (text and suffix all kept)."""
    log_group_size: torch.Tensor
    """Per kept key: ``log(group size)``; 0 for text and suffix keys."""
    uniform: bool
    """All kept keys stand for the same number of keys: the correction is a constant and cancels."""


@memoised(maxsize=256)
def select_keys(
    layout: SequenceLayout,
    factor: float,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    temporal_factor: float = 1.0,
) -> KeySelection:
    """Memoised per layout, factors, device and dtype: the same few layouts recur in every block and step.

    ``factor`` reduces each frame's grid; ``temporal_factor`` keeps one frame of
    every group of frames (video), each kept key then standing for its group
    across frames too. While torch.compile traces, the selection is built in the graph.
    """
    cpu = torch.device("cpu")
    rows, cols = nearest_indices(layout.height, factor, cpu), nearest_indices(layout.width, factor, cpu)
    frames = nearest_indices(layout.frames, temporal_factor, cpu)
    per_frame = (rows[:, None] * layout.width + cols[None, :]).reshape(-1)
    frame_offsets = frames[:, None] * (layout.height * layout.width)
    image = (frame_offsets + per_frame[None, :]).reshape(-1) + layout.prefix
    suffix_start = layout.prefix + layout.image_tokens
    indices = torch.cat((torch.arange(layout.prefix), image, torch.arange(suffix_start, suffix_start + layout.suffix)))

    sides = ((layout.frames, temporal_factor), (layout.height, factor), (layout.width, factor))
    frame_sizes, row_sizes, col_sizes = (_group_sizes(side, side_factor) for side, side_factor in sides)
    group = (
        torch.tensor(frame_sizes, dtype=torch.float64)[:, None, None]
        * torch.tensor(row_sizes, dtype=torch.float64)[None, :, None]
        * torch.tensor(col_sizes, dtype=torch.float64)[None, None, :]
    ).reshape(-1)
    log_group = torch.cat(
        (torch.zeros(layout.prefix, dtype=torch.float64), group.log(), torch.zeros(layout.suffix, dtype=torch.float64))
    )
    # Products of positive sizes are all equal exactly when each side's sizes are: decided without a tensor.
    sizes_uniform = all(len(set(sizes)) == 1 for sizes in (frame_sizes, row_sizes, col_sizes))
    uniform = layout.prefix == 0 and layout.suffix == 0 and sizes_uniform
    return KeySelection(indices.to(device), log_group.to(device=device, dtype=dtype), uniform)


def reduce_keys(
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    layout: SequenceLayout,
    factor: float,
    sequence_dim: int,
    mass_correction: bool = True,
    temporal_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keys, values and additive mask for attention over the kept keys only.

    ``mask`` is the caller's own mask over the full key sequence, or ``None``:
    any form ComfyUI's families pass (``[Lk]``, ``[Lq, Lk]``, ``[B, Lq, Lk]``,
    ``[B, 1 or H, Lq, Lk]``; boolean or float of any precision). It keeps its
    number of dimensions and its dtype, because the backends read its leading
    axes by count (a 3-D mask is per batch item, a 4-D one per head too). The
    returned mask adds ``log(group size)`` to every kept key's logit; it is
    ``None`` when nothing needs adding, so the backend keeps its mask-free kernel.
    """
    selection = select_keys(layout, factor, k.device, k.dtype, temporal_factor)
    k_small = k.index_select(sequence_dim, selection.indices)
    v_small = k_small if v is k else v.index_select(sequence_dim, selection.indices)
    correct = mass_correction and not selection.uniform
    if mask is not None:
        if mask.shape[-1] != 1:  # a mask broadcast over the keys applies to the kept keys as it is
            mask = mask.index_select(-1, selection.indices.to(mask.device))
        if correct and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=k.dtype, device=mask.device).masked_fill_(~mask, -math.inf)
    if correct:
        if mask is None:
            mask = selection.log_group_size.view(1, 1, 1, -1)
        else:
            bias = selection.log_group_size.to(device=mask.device, dtype=mask.dtype)
            mask = mask + bias.view(*(1,) * (mask.ndim - 1), -1)
    return k_small, v_small, mask


@dataclass(frozen=True)
class KeyGroups:
    """The kept keys of one layout split by group size, for the routes that need no mask (``routes.py``)."""

    bias_max: float
    """The largest ``log(group size)``, on the host."""
    sets: tuple[tuple[torch.Tensor, float], ...]
    """Per distinct group size: the positions of its keys among the kept keys, and ``log(group size)``."""


@memoised(maxsize=256)
def key_groups(layout: SequenceLayout, factor: float, device: torch.device, temporal_factor: float = 1.0) -> KeyGroups:
    """Memoised with :func:`select_keys`: computed once per layout on the host, never per call."""
    log_sizes = select_keys(layout, factor, torch.device("cpu"), torch.float64, temporal_factor).log_group_size
    distinct = sorted(set(log_sizes.tolist()))
    sets = tuple((torch.nonzero(log_sizes == value).reshape(-1).to(device), value) for value in distinct)
    return KeyGroups(max(distinct), sets)


_BLOCK_ITEM = re.compile(r"^(?:(double|single)\s*(?::\s*)?)?(?:(\d+)\s*(?:-\s*(\d+))?)?$")


@dataclass(frozen=True, slots=True)
class BlockSelection:
    """Which transformer blocks ToDo acts in, parsed from the node's ``dit_blocks`` text.

    ``all``; or a comma-separated list of ``double``, ``single``, an index or
    range (``0-9``, any block type), or both (``single:0-19``). Flux has double
    and single blocks, Qwen-Image and Wan report theirs as double.
    """

    items: tuple[tuple[str | None, int, int], ...] | None
    """(block type or None for any, first, last); ``None`` selects every block."""
    texts: tuple[str, ...] = ()
    """Each item as the user wrote it, for messages."""

    @classmethod
    def parse(cls, text: str) -> BlockSelection:
        if not isinstance(text, str):
            raise ConfigError(f"dit_blocks must be text such as 'all' or 'double, single:0-19'; got {text!r}")
        if text.strip().lower() in ("", "all"):
            return cls(None)
        items = []
        for raw in text.lower().split(","):
            match = _BLOCK_ITEM.match(raw.strip())
            if match is None or not raw.strip():
                raise ConfigError(
                    f"dit_blocks: cannot read {raw.strip()!r}; use 'all', 'double', 'single', "
                    "an index or range like '0-9', or 'single:0-19', separated by commas"
                )
            block_type, first, last = match.groups()
            low = int(first) if first is not None else 0
            high = int(last) if last is not None else (low if first is not None else math.inf)
            if high < low:
                raise ConfigError(f"dit_blocks: range {raw.strip()!r} ends before it starts")
            items.append((block_type, low, high))
        return cls(tuple(items), tuple(raw.strip() for raw in text.split(",")))

    @property
    def is_all(self) -> bool:
        return self.items is None

    def names_nothing_in(self, block_counts: Mapping[str, int]) -> list[str]:
        """The items, as written, that select no block of a model with ``block_counts`` blocks per type."""
        if self.items is None:
            return []
        return [
            text
            for (kind, low, _high), text in zip(self.items, self.texts, strict=True)
            if not any(low < count for block_type, count in block_counts.items() if kind in (None, block_type))
        ]

    def contains(self, block_type: str | None, block_index: int | None) -> bool:
        if self.items is None:
            return True
        return any(
            (kind is None or kind == block_type) and low <= block_index <= high for kind, low, high in self.items
        )


AttentionOverride = Callable[..., torch.Tensor]

BACKENDS_WITHOUT_MASKS = MASKLESS_BACKENDS


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    skip_reshape: bool = False,
    skip_output_reshape: bool = False,
    **_: Any,
) -> torch.Tensor:
    """PyTorch SDPA with the calling convention of ComfyUI's attention backends.

    Runs the mass-corrected calls that a mask-less backend would get wrong,
    as ComfyUI itself falls back to SDPA when SageAttention 3 meets a mask.
    """
    if skip_reshape:
        batch, dim_head = q.shape[0], q.shape[-1]
    else:
        batch, dim_head = q.shape[0], q.shape[-1] // heads
        q, k, v = (t.reshape(batch, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(batch, -1, heads * dim_head)


class ToDoAttentionOverride:
    """ComfyUI's ``optimized_attention_override`` for DiTs: the attention backend runs on the kept keys.

    Called as ``override(attention, q, k, v, heads, mask=..., skip_reshape=...,
    transformer_options=...)`` in place of the selected attention backend. It
    holds no state between calls; an override already registered on the model
    (another pack's) is kept and called with the reduced keys.
    """

    def __init__(
        self,
        config: ToDoConfig,
        family: DiTFamily,
        blocks: BlockSelection,
        inner: AttentionOverride | None = None,
        mass_correction: bool = True,
    ) -> None:
        self.config = config
        self.family = family
        self.blocks = blocks
        self.inner = inner
        self.mass_correction = mass_correction
        self.settings = hash((config, family.name, blocks, mass_correction))
        """What a compiled graph traced with this override depends on (see :class:`~.patch.ModelCall`)."""

    def __repr__(self) -> str:
        return f"ToDoAttentionOverride({self.family.name}, {self.config}, blocks={self.blocks})"

    def with_inner(self, inner: AttentionOverride | None) -> ToDoAttentionOverride:
        """The same override around another one (an override registered before ToDo's)."""
        return ToDoAttentionOverride(self.config, self.family, self.blocks, inner, self.mass_correction)

    def _call(self, attention: AttentionOverride, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.inner is not None:
            # Marked, so that a ToDo override the inner one may hold itself leaves the call as it is.
            kwargs["transformer_options"] = {**(kwargs.get("transformer_options") or {}), APPLIED_KEY: True}
            return self.inner(attention, *args, **kwargs)
        return attention(*args, **kwargs)

    def factor_for(self, layout: SequenceLayout) -> float:
        return self.config.image_token_factor(layout.height, layout.width, self.family.native_tokens)

    def temporal_factor_for(self, layout: SequenceLayout) -> float:
        """Video families only, and only where there are frames to reduce."""
        return self.config.temporal_factor if self.family.video and layout.frames > 1 else 1.0

    def plan(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[SequenceLayout, float, float] | None:
        """The layout and factor for this call, or ``None`` to leave it exactly as it is."""
        options = kwargs.get("transformer_options") or {}
        traced = traced_call()  # torch.compile: the model call's record, which dynamo guards (transformer_options not)
        latent = options.get(LATENT_INFO_KEY) if traced is None else traced.latent
        if latent is None or len(args) < 3:
            return None
        q, k, v = args[:3]
        if not in_sigma_window(options, self.settings):
            return None
        if not self._block_selected(options):
            return None
        sequence_dim = 2 if kwargs.get("skip_reshape", False) else 1
        # SD3 hands v over with its heads split out: compare only batch and sequence.
        same_keys = k.shape[: sequence_dim + 1] == v.shape[: sequence_dim + 1]
        if not same_keys or q.ndim != k.ndim or q.shape[sequence_dim] != k.shape[sequence_dim]:
            return None  # cross-attention (Wan's text, image-prompt tokens): nothing to reduce
        if options.get(CROSS_ATTENTION_KEY):
            return None  # Wan's cross-attention looks like self-attention when the text is as long as the video
        n_tokens = k.shape[sequence_dim]
        layout = resolve_layout(n_tokens, latent, self.family)
        if layout is None:
            if not holds_no_image(n_tokens, latent, self.family):
                warn_once(
                    "dit-layout",
                    f"ToDo: {self.family.label or self.family.name} attention over {n_tokens} tokens does not hold "
                    f"the image grid of the {latent.frames}x{latent.height}x{latent.width} latent "
                    f"({describe_grid(latent, self.family)}, {latent.text_tokens} text and {latent.before} reference "
                    "tokens); those calls are left unchanged.",
                    options.get("sample_sigmas"),
                )
            return None
        factor, temporal_factor = self.factor_for(layout), self.temporal_factor_for(layout)
        call = call_calibration(options)
        if call is not None:
            factor = self._calibrated(call, args, kwargs, layout, factor, temporal_factor, options)
        kept = output_side(layout.frames, temporal_factor) * output_tokens(layout.height, layout.width, factor, factor)
        if kept == layout.image_tokens:
            return None  # as on UNets, a factor that leaves one key per frame still acts
        return layout, factor, temporal_factor

    def _calibrated(
        self,
        call: CallCalibration,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        layout: SequenceLayout,
        factor: float,
        temporal_factor: float,
        options: Mapping[str, Any],
    ) -> float:
        """Fidelity mode's factor for this block, layout, band and branch, or ``factor`` with its error measured.

        Measured on exactly what the reduced call computes: the same kept keys,
        the same mass correction, the caller's own mask.
        """
        q, k, v, *rest = args
        heads = rest[0] if rest else kwargs.get("heads")
        mask = rest[1] if len(rest) >= 2 else kwargs.get("mask")
        heads_split = bool(kwargs.get("skip_reshape", False))
        sequence_dim = 2 if heads_split else 1
        group, layer = call.layer_key(options)
        grid = (layout.prefix, layout.frames, layout.height, layout.width, layout.suffix)
        key = DecisionKey(group, layer, grid, call.band, call.branch)
        seed = stable_seed(self.family.name, layer, grid)

        def kept_keys(candidate: float) -> int:
            kept_frames = output_side(layout.frames, temporal_factor)
            kept_image = kept_frames * output_tokens(layout.height, layout.width, candidate, candidate)
            return layout.prefix + layout.suffix + kept_image

        def reduce(candidate: float):
            return reduce_keys(k, v, mask, layout, candidate, sequence_dim, self.mass_correction, temporal_factor)

        def selection(candidate: float) -> tuple[torch.Tensor, torch.Tensor | None]:
            kept = select_keys(layout, candidate, k.device, torch.float32, temporal_factor)
            return kept.indices, kept.log_group_size if self.mass_correction and not kept.uniform else None

        def queries() -> SampledQueries:
            return SampledQueries.of(q, heads, heads_split, sample_rows(q.shape[sequence_dim], SAMPLED_ROWS, seed))

        fidelity = self.config.mode is FactorMode.FIDELITY
        return calibrated_factor(
            call,
            key,
            fidelity,
            self.config.max_error,
            factor,
            queries,
            k,
            v,
            mask,
            reduce,
            kept_keys,
            layout.tokens,
            selection,
        )

    def _block_selected(self, options: Mapping[str, Any]) -> bool:
        if self.blocks.is_all:
            return True
        block_index = options.get("block_index")
        if block_index is None:
            warn_once(
                "dit-blocks",
                f"ToDo: {self.family.name} does not report block indices; dit_blocks cannot select among its "
                "blocks and ToDo acts in all of them.",
                options.get("sample_sigmas"),
            )
            return True
        return self.blocks.contains(options.get("block_type"), block_index)

    def __call__(self, attention: AttentionOverride, *args: Any, **kwargs: Any) -> torch.Tensor:
        options = kwargs.get("transformer_options") or {}
        if options.get(APPLIED_KEY):
            return attention(*args, **kwargs)  # ToDo already acted on this call, around another override
        plan = self.plan(args, kwargs)
        if plan is None:
            return self._call(attention, *args, **kwargs)
        layout, factor, temporal_factor = plan
        q, k, v, *rest = args
        # The mask is the fifth positional argument of every ComfyUI backend, or a keyword.
        caller_mask = rest[1] if len(rest) >= 2 else kwargs.pop("mask", None)
        skip_reshape = bool(kwargs.get("skip_reshape", False))
        sequence_dim = 2 if skip_reshape else 1
        selection = select_keys(layout, factor, k.device, k.dtype, temporal_factor)
        correct = self.mass_correction and not selection.uniform
        heads = rest[0] if rest else kwargs.pop("heads")
        rest = rest[1:]
        route = Route.MASK
        if correct:
            dim_head = q.shape[-1] if skip_reshape else q.shape[-1] // heads
            backend = getattr(attention, "__name__", "")
            foreign = self.inner is not None and not getattr(self.inner, PASSES_MASKS_ATTRIBUTE, False)
            route = choose_route(backend, foreign, dim_head, q.device.type, caller_mask is not None)
        masked_correction = correct and route in (Route.MASK, Route.SDPA)
        k, v, mask = reduce_keys(k, v, caller_mask, layout, factor, sequence_dim, masked_correction, temporal_factor)
        if route is Route.FOLD:
            groups = key_groups(layout, factor, k.device, temporal_factor)
            rest = self._with_mask(rest, kwargs, mask)
            return attend_folded(
                functools.partial(self._call, attention),
                q,
                k,
                v,
                heads,
                selection.log_group_size,
                groups.bias_max,
                tuple(rest),
                kwargs,
            )
        if route in (Route.LSE_MERGE, Route.SDPA):
            warn_once(
                "mask-backend",
                f"ToDo: the attention backend ({self._backend_label(attention)}) cannot take ToDo's mass correction "
                f"without a mask at head width {dim_head}; the joint-attention calls ToDo reduces run on PyTorch's "
                "attention instead.",
                options.get("sample_sigmas"),
            )
        if route is Route.LSE_MERGE:
            groups = key_groups(layout, factor, k.device, temporal_factor)
            return attend_lse_merged(
                q, k, v, heads, groups.sets, skip_reshape, bool(kwargs.get("skip_output_reshape", False))
            )
        rest = self._with_mask(rest, kwargs, mask)
        if route is Route.SDPA:
            return sdpa_attention(q, k, v, heads, *rest, **kwargs)
        return self._call(attention, q, k, v, heads, *rest, **kwargs)

    @staticmethod
    def _with_mask(rest: list[Any], kwargs: dict[str, Any], mask: torch.Tensor | None) -> list[Any]:
        """The positional arguments after ``heads`` with ``mask`` in its place (positional or keyword)."""
        if rest:
            return [mask, *rest[1:]]
        if mask is not None:
            kwargs["mask"] = mask
        return rest

    def _backend_label(self, attention: AttentionOverride) -> str:
        if self.inner is not None:
            name = getattr(self.inner, "__qualname__", type(self.inner).__name__)
            return f"another node's attention override, {name}"
        return f"ComfyUI's {getattr(attention, '__name__', 'selected backend')}"
