"""Fidelity mode: ToDo measures its own attention error on the model in front of it.

For each attention layer, token grid and noise band that a render meets, the
error that each candidate factor causes is measured on a seeded, stratified
sample of query rows: exact attention over every key against attention over the
kept keys, exactly as the reduced call computes it (the same kept keys, the
same mass correction, the caller's own mask). Attention is row-independent, so
a few dozen rows cost a few dozen rows of scores, not ``N**2``. The largest
candidate whose relative error stays within ``max_error`` is kept for that
layer, grid, band and branch for the rest of the render, and reported once when
the render ends.

The error is that of the attention output (``||O_todo - O_exact|| /
||O_exact||`` over the sampled rows, every head and batch item): a measure of
how much one layer's attention changes, not of image quality. Errors of many
layers and steps compound through the network, and a small change in attention
can move a sample's details without making it worse.

Nothing here imports ComfyUI; nothing here changes torch's global random state.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .memo import is_compiling

logger = logging.getLogger("comfyui_todo")

CANDIDATE_FACTORS: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
"""Factors fidelity mode measures, smallest first (1 = no reduction is always allowed)."""
SAMPLED_ROWS = 64
"""Query rows measured per layer, grid and band: one from each of as many equal strata of the sequence."""
NOISE_BANDS = ("early", "middle", "late")
"""Thirds of the model's schedule (by ``percent_to_sigma``): attention sharpens as the noise falls."""
MAX_SCORE_ELEMENTS = 1 << 24
"""Attention scores held at once while measuring (64 MiB of float32): heads are measured in chunks beyond it."""

Reduction = Callable[[float], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
"""Factor -> (keys, values, mask) of the reduced call, in the caller's own layout."""
Selection = Callable[[float], tuple[torch.Tensor, torch.Tensor | None]]
"""Factor -> (positions of the kept keys, ``log(group size)`` added to their logits or None), for reductions that
keep a subset of the keys (nearest sampling): their scores are columns of the exact scores, computed once."""


def stable_seed(*parts: Hashable) -> int:
    """A seed from a key, equal in every process (Python's ``hash`` of text is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def sample_rows(n_rows: int, count: int, seed: int) -> torch.Tensor:
    """``count`` row indices, one at a seeded position inside each of ``count`` equal strata of ``n_rows``.

    Stratified rather than uniform: neighbouring rows have similar errors, so
    covering the whole sequence evenly gives a steadier estimate from few rows.
    Uses its own generator, never torch's global one (the sampler's noise).
    """
    if n_rows <= count:
        return torch.arange(n_rows)
    generator = torch.Generator().manual_seed(seed)
    edges = torch.arange(count + 1, dtype=torch.int64) * n_rows // count
    widths = (edges[1:] - edges[:-1]).double()
    offsets = (torch.rand(count, generator=generator, dtype=torch.float64) * widths).long()
    return edges[:-1] + offsets


def split_heads(tokens: torch.Tensor, heads: int, heads_split: bool) -> torch.Tensor:
    """``[B, H, N, d]`` view of a tensor in ComfyUI's attention layout: ``[B, N, H*d]`` (or ``[B, N, H, d]``, as
    SD3 hands values over) unless the caller split the heads out already."""
    if heads_split:
        if tokens.ndim != 4:
            raise ValueError(f"expected [B, H, N, d] tokens, got shape {tuple(tokens.shape)}")
        return tokens
    if tokens.ndim not in (3, 4) or (tokens[0, 0].numel() % heads):
        raise ValueError(f"expected [B, N, {heads} x d] tokens, got shape {tuple(tokens.shape)}")
    return tokens.reshape(tokens.shape[0], tokens.shape[1], heads, -1).transpose(1, 2)


def mask_bias(mask: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """A caller's mask as a float ``[B|1, H|1, S|1, Nk]`` bias on the sampled query rows (ComfyUI's conventions).

    ``[Nk]``, ``[Nq, Nk]`` and ``[B, Nq, Nk]`` masks gain their missing leading
    axes as ComfyUI's backends add them; boolean masks keep ``True`` keys.
    """
    if mask is None:
        return None
    while mask.ndim < 4:
        mask = mask.unsqueeze(1 if mask.ndim == 3 else 0)
    if rows is not None and mask.shape[-2] > 1:
        mask = mask.index_select(-2, rows.to(mask.device))
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, -math.inf)
    return mask.float()


@dataclass(frozen=True)
class SampledQueries:
    """The sampled query rows of one attention call, and exact attention for them."""

    q: torch.Tensor
    """``[B, H, S, d]`` float32 query rows."""
    rows: torch.Tensor
    heads: int
    heads_split: bool

    @classmethod
    def of(cls, q: torch.Tensor, heads: int, heads_split: bool, rows: torch.Tensor) -> SampledQueries:
        q_heads = split_heads(q, heads, heads_split)
        return cls(q_heads.index_select(2, rows.to(q.device)).float(), rows, heads, heads_split)

    def score_chunks(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per chunk of heads: the float32 scores of the sampled rows over ``k`` (the caller's mask added) and the
        values; chunks keep at most ``MAX_SCORE_ELEMENTS`` scores at once."""
        k_heads, v_heads = split_heads(k, self.heads, self.heads_split), split_heads(v, self.heads, self.heads_split)
        if k_heads.shape[0] != self.q.shape[0]:
            raise ValueError("queries and keys have different batch sizes (tiled queries)")
        bias = mask_bias(mask, self.rows)
        scale = self.q.shape[-1] ** -0.5
        batch, heads, rows, _ = self.q.shape
        chunk = max(1, MAX_SCORE_ELEMENTS // max(1, batch * rows * k_heads.shape[2]))
        for first in range(0, heads, chunk):
            last = min(heads, first + chunk)
            scores = self.q[:, first:last] @ k_heads[:, first:last].float().transpose(-1, -2) * scale
            if bias is not None:
                scores = scores + (bias if bias.shape[1] == 1 else bias[:, first:last])
            yield scores, v_heads[:, first:last].float()

    def attend(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Softmax attention of the sampled rows over ``k``/``v`` (caller's layout), in float32."""
        return torch.cat([scores.softmax(dim=-1) @ values for scores, values in self.score_chunks(k, v, mask)], dim=1)

    def selection_errors(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        selections: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    ) -> list[float]:
        """Relative error of attention over each subset of the keys, from one pass over the exact scores.

        The same numbers as :meth:`attend` on the reduced keys and mask, at a
        fraction of the cost: the kept keys' scores are columns of the exact
        scores, so no candidate copies or multiplies the full keys again.
        """
        squared = torch.zeros(len(selections), dtype=torch.float64, device=self.q.device)
        norm = torch.zeros((), dtype=torch.float64, device=self.q.device)
        for scores, values in self.score_chunks(k, v, mask):
            exact = scores.softmax(dim=-1) @ values
            norm += exact.double().square().sum()
            for index, (kept, log_group) in enumerate(selections):
                kept = kept.to(scores.device)
                reduced = scores.index_select(-1, kept)
                if log_group is not None:
                    reduced = reduced + log_group.to(device=scores.device, dtype=scores.dtype)
                out = reduced.softmax(dim=-1) @ values.index_select(2, kept)
                squared[index] += (out - exact).double().square().sum()
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError("exact attention output is zero or not finite")
        return (squared / norm).sqrt().tolist()


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` over every element: the benchmark's measure of attention fidelity."""
    norm = exact.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("exact attention output is zero or not finite")
    return float((approx - exact).norm() / norm)


@dataclass(frozen=True, slots=True)
class Measurement:
    """What one layer, grid, band and branch was measured to give."""

    factor: float
    """The factor used (1 = none)."""
    error: float
    """Relative attention-output error of ``factor`` on the sampled rows (0 at factor 1)."""
    kept: int
    """Keys kept per call at ``factor``."""
    tokens: int
    """Keys per call without ToDo."""
    measured: bool = True
    """False when nothing could be measured and the fallback factor was used."""
    rejected_error: float | None = None
    """Fidelity mode: the error of the smallest candidate above the budget (what a further reduction would cost)."""


def candidate_errors(
    queries: SampledQueries,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    reduce: Reduction,
    selection: Selection | None,
    factors: Sequence[float],
) -> list[float]:
    """Relative error of each factor on the sampled rows: by key subsets where the reduction selects keys."""
    if not factors:
        return []
    if selection is not None:
        return queries.selection_errors(k, v, mask, [selection(factor) for factor in factors])
    exact = queries.attend(k, v, mask)
    errors = []
    for factor in factors:
        k_small, v_small, mask_small = reduce(factor)
        errors.append(relative_error(queries.attend(k_small, v_small, mask_small), exact))
    return errors


def choose_factor(
    queries: SampledQueries,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    reduce: Reduction,
    candidates: Sequence[float],
    max_error: float,
    kept_keys: Callable[[float], int],
    tokens: int,
    selection: Selection | None = None,
) -> Measurement:
    """The candidate that keeps the fewest keys with an error on the sampled rows within ``max_error`` (1 if none).

    ``kept_keys(factor)`` counts the keys a factor keeps out of ``tokens``.
    Every candidate is measured: the error need not grow monotonically with
    the factor (a factor that divides the grid can beat a smaller one that
    does not). Factor 1 still reduces where a temporal factor is set: it is
    then measured too, and kept whatever its error. ``selection``, where the
    reduction keeps a subset of the keys, measures every candidate in one pass.
    ``rejected_error`` is the smallest error among the candidates that would
    have kept fewer keys: what a further reduction would cost.
    """
    measurable = [factor for factor in dict.fromkeys((1.0, *candidates)) if kept_keys(factor) < tokens]
    errors = dict(zip(measurable, candidate_errors(queries, k, v, mask, reduce, selection, measurable), strict=True))
    within = [factor for factor in candidates if factor in errors and errors[factor] <= max_error]
    if within:  # the fewest keys; between factors that keep as many (4 and 5 on a side of 12), the smaller error
        choice = min(within, key=lambda factor: (kept_keys(factor), errors[factor]))
        best = Measurement(choice, errors[choice], kept_keys(choice), tokens)
    else:
        best = Measurement(1.0, errors.get(1.0, 0.0), kept_keys(1.0), tokens)
    further = [errors[f] for f in candidates if f in errors and errors[f] > max_error and kept_keys(f) < best.kept]
    return dataclasses.replace(best, rejected_error=min(further) if further else None)


def measure_factor(
    queries: SampledQueries,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    reduce: Reduction,
    factor: float,
    kept_keys: Callable[[float], int],
    tokens: int,
    selection: Selection | None = None,
) -> Measurement:
    """The error a fixed factor causes (auto and manual modes, when asked to report it)."""
    kept = kept_keys(factor)
    if kept >= tokens:
        return Measurement(factor, 0.0, tokens, tokens)
    (error,) = candidate_errors(queries, k, v, mask, reduce, selection, [factor])
    return Measurement(factor, error, kept, tokens)


@dataclass(frozen=True, slots=True)
class DecisionKey:
    """One cached decision: a layer, its grid, the noise band and the branch (cond/uncond) of the calls."""

    group: tuple
    """How the report groups layers: ``("depth", d)`` for UNets, ``(block_type, index)`` for DiTs."""
    layer: tuple
    """The layer itself (UNet block and transformer index; DiT block type and index)."""
    grid: tuple[int, ...]
    band: int
    branch: tuple


@dataclass
class Calibration:
    """The decisions of one render (one sampling run of one model): made once, then looked up.

    Lives only as long as the render: a new render, another model or another
    ToDo node starts from nothing. Decisions are keyed by branch too, so the
    calls of one branch never use what another branch's outputs measured.
    """

    label: str
    """The model as the report names it."""
    mode: str
    max_error: float | None
    decisions: dict[DecisionKey, Measurement] = field(default_factory=dict)
    calls: dict[DecisionKey, int] = field(default_factory=dict)
    failures: int = 0
    seconds: float = 0.0
    """Time spent measuring (host clock, around each measurement): the calibration's own cost."""
    quiet: bool = False
    """Failures are counted, not logged: a model called outside a sampler after such a call already warned."""

    def decide(
        self, key: DecisionKey, measure: Callable[[], Measurement], fallback: Callable[[], Measurement]
    ) -> float:
        """The factor for ``key``: measured the first time, looked up after; ``fallback`` when measuring fails."""
        decision = self.decisions.get(key)
        if decision is None:
            started = time.perf_counter()
            try:
                decision = measure()
            except Exception as error:
                self.failures += 1
                decision = fallback()
                if self.failures == 1 and not self.quiet:
                    logger.warning(
                        "ToDo: could not measure attention error in %s (%s: %s); such layers use auto mode's factor.",
                        key.layer,
                        type(error).__name__,
                        error,
                    )
            self.seconds += time.perf_counter() - started
            self.decisions[key] = decision
        self.calls[key] = self.calls.get(key, 0) + 1
        return decision.factor

    def peek(self, key: DecisionKey) -> float | None:
        """The factor decided for ``key``, not counted (a call another hook of the same layer counted already)."""
        decision = self.decisions.get(key)
        return None if decision is None else decision.factor

    def lookup(self, key: DecisionKey) -> float | None:
        """The factor decided for ``key``, counted as one more call; ``None`` while it is not decided yet."""
        decision = self.decisions.get(key)
        if decision is None:
            return None
        self.calls[key] = self.calls.get(key, 0) + 1
        return decision.factor

    def report(self) -> str | None:
        """One line: factor and error per depth or block range, and the keys kept over every counted call."""
        if not self.decisions:
            return None
        groups = _grouped(self.decisions.items())
        parts = [
            f"{label}: {_factors(factors)}{_errors(factors, errors, rejected)}"
            for label, factors, errors, rejected in groups
        ]
        kept = sum(self.decisions[k].kept * n for k, n in self.calls.items())
        total = sum(self.decisions[k].tokens * n for k, n in self.calls.items())
        budget = f" (max_error {self.max_error:.3g})" if self.max_error is not None else ""
        share = f"; keys kept {kept / total:.0%} of {total:,} over {sum(self.calls.values()):,} attention calls"
        fallback = f"; {self.failures} layer(s) not measurable, auto factor used" if self.failures else ""
        cost = f"; measuring took {self.seconds:.2f} s"
        return f"ToDo {self.mode}{budget}, {self.label}: " + "; ".join(parts) + share + fallback + cost


Group = tuple[str, list[float], list[float], list[float]]
"""Report label, and the factors, errors and first rejected candidates' errors of its decisions."""


def _grouped(items: Iterable[tuple[DecisionKey, Measurement]]) -> list[Group]:
    """Decisions grouped for the report: per UNet depth, or per run of consecutive DiT blocks with equal factors."""
    per_group: dict[tuple, tuple[list[float], list[float], list[float]]] = {}
    for key, decision in items:
        factors, errors, rejected = per_group.setdefault(key.group, ([], [], []))
        factors.append(decision.factor)
        if decision.measured:
            errors.append(decision.error)
        if decision.rejected_error is not None:
            rejected.append(decision.rejected_error)
    ordered = sorted(per_group.items(), key=lambda item: tuple((x is None, str(x)) for x in item[0][:1]) + item[0][1:])
    if ordered and ordered[0][0][0] == "depth":
        return [(f"depth {group[1]}", *lists) for group, lists in ordered]
    runs: list[tuple[str | None, int, int, list[float], list[float], list[float]]] = []
    for (block_type, index), (factors, errors, rejected) in ordered:
        same = runs and runs[-1][0] == block_type and runs[-1][2] == index - 1
        if same and (min(runs[-1][3]), max(runs[-1][3])) == (min(factors), max(factors)):
            kind, first, _, run_factors, run_errors, run_rejected = runs[-1]
            runs[-1] = (kind, first, index, run_factors + factors, run_errors + errors, run_rejected + rejected)
        else:
            runs.append((block_type, index, index, list(factors), list(errors), list(rejected)))
    return [(_block_label(kind, first, last), *lists) for kind, first, last, *lists in runs]


def _block_label(kind: str | None, first: int, last: int) -> str:
    if first < 0:
        return "all blocks"
    span = f"{first}" if first == last else f"{first}-{last}"
    return f"{kind} {span}" if kind else f"blocks {span}"


def _factors(factors: list[float]) -> str:
    low, high = min(factors), max(factors)
    return f"factor {low:.3g}" if low == high else f"factor {low:.3g}-{high:.3g}"


def _errors(factors: list[float], errors: list[float], rejected: list[float]) -> str:
    """The largest error measured; where nothing was reduced, what the smallest reduction would have cost."""
    if not errors:
        return ", not measured"
    if max(factors) <= 1.0 and max(errors) == 0.0 and rejected:
        return f" (the smallest reduction would cause {min(rejected):.1%})"
    return f", error <= {max(errors):.1%}"


class CalibrationStore:
    """The calibration of the render in progress, shared by the node's sampling and model-call wrappers.

    The sampling wrapper opens one per sampling run and logs its report when
    the run ends; the model-call wrapper hands the open one to the attention
    calls. A model called outside a sampler gets a fresh one per model call
    (measured every time, never reported).
    """

    def __init__(self, label: str, mode: str, max_error: float | None) -> None:
        self.label, self.mode, self.max_error = label, mode, max_error
        self._open: list[Calibration] = []
        self._outside: Calibration | None = None
        """The calibration of the last model call made outside a sampler."""
        self._outside_warned = False

    def open(self) -> Calibration:
        calibration = Calibration(self.label, self.mode, self.max_error)
        self._open.append(calibration)
        return calibration

    def close(self, calibration: Calibration) -> None:
        if calibration in self._open:
            self._open.remove(calibration)
        line = calibration.report()
        if line is not None:
            logger.info(line)

    def current(self) -> Calibration:
        """The open render's calibration; outside a sampler a fresh one per model call, which warns of a layer it
        cannot measure only until one such call has (model calls outside a sampler have no render to warn once
        per)."""
        if self._open:
            return self._open[-1]
        if self._outside is not None and self._outside.failures:
            self._outside_warned = True
        self._outside = Calibration(self.label, self.mode, self.max_error, quiet=self._outside_warned)
        return self._outside


@dataclass(frozen=True, slots=True)
class NoiseBands:
    """The sigmas at which the schedule passes from one band to the next (descending)."""

    edges: tuple[float, ...]

    @classmethod
    def of(cls, percent_to_sigma: Callable[[float], float]) -> NoiseBands:
        return cls(tuple(float(percent_to_sigma(i / len(NOISE_BANDS))) for i in range(1, len(NOISE_BANDS))))

    def band(self, sigma: float) -> int:
        return sum(1 for edge in self.edges if sigma <= edge)


CALIBRATION_KEY = "todo_calibration"
"""``transformer_options`` entry: the :class:`CallCalibration` of the model call (set by the node's wrapper)."""


@dataclass(frozen=True)
class CallCalibration:
    """What the attention calls of one model call need to look decisions up: the render's store, band and branch."""

    calibration: Calibration
    band: int
    branch: tuple
    ordinal: Iterator[int] = field(default_factory=itertools.count)
    """Numbers the measured calls of this model call in order: the layer name of models without block indices."""
    seen: dict[tuple, int] = field(default_factory=dict)
    """Measured calls of this model call per block type and index: Wan VACE's blocks run under the index of the
    main block they follow, and each is a layer of its own."""

    def layer_key(self, options: Mapping[str, Any]) -> tuple[tuple, tuple]:
        """(report group, layer) of a DiT call: its block type and index, or its place in the model call.

        A later call under a block index already met in this model call (another layer reporting the same index)
        is a layer of its own: its place among them is added to the index.
        """
        index = options.get("block_index")
        if index is None:
            index, block_type = next(self.ordinal), None
        else:
            block_type = options.get("block_type")
        group = (block_type, int(index))
        occurrence = self.seen.get(group, 0)
        self.seen[group] = occurrence + 1
        return group, group if occurrence == 0 else (*group, occurrence)


def unet_key(call: CallCalibration, options: Mapping[str, Any], height: int, width: int, depth: int) -> DecisionKey:
    """The decision key of a UNet attn1 call: the same from the attn1 patch's options and the override's."""
    layer = (tuple(options.get("block") or ()), int(options.get("block_index", 0)))
    return DecisionKey(("depth", depth), layer, (height, width), call.band, call.branch)


def call_calibration(options: Mapping[str, Any]) -> CallCalibration | None:
    """The model call's calibration, unless torch.compile traces (measuring reads the host: auto mode then)."""
    call = options.get(CALIBRATION_KEY)
    return None if call is None or is_compiling() else call


def calibrated_factor(
    call: CallCalibration,
    key: DecisionKey,
    fidelity: bool,
    max_error: float,
    factor: float,
    queries: Callable[[], SampledQueries],
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    reduce: Reduction,
    kept_keys: Callable[[float], int],
    tokens: int,
    selection: Selection | None = None,
) -> float:
    """The factor for one attention call: fidelity mode's choice, or ``factor`` with its error measured.

    ``factor`` is the configured one (auto's in fidelity mode, used wherever
    nothing can be measured).
    """

    def measure() -> Measurement:
        sampled = queries()
        if fidelity:
            return choose_factor(
                sampled, k, v, mask, reduce, CANDIDATE_FACTORS, max_error, kept_keys, tokens, selection
            )
        return measure_factor(sampled, k, v, mask, reduce, factor, kept_keys, tokens, selection)

    def fallback() -> Measurement:
        return Measurement(factor, 0.0, kept_keys(factor), tokens, measured=False)

    return call.calibration.decide(key, measure, fallback)
