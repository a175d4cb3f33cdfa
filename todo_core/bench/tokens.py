"""Attention inputs with the spatial structure of real latents, built from photographs.

White noise makes every downsampling method look either perfect or useless:
neighbouring noise tokens share nothing. Real latents are smooth with edges, so
the tokens here come from real photographs (scikit-image's bundled samples):
each 4x4 RGB patch becomes one token through a fixed seeded projection to the
channel width, then layer normalisation, as a UNet's hidden states are before
attn1. Queries, keys and values are seeded random projections of those tokens,
scaled so the attention logits have a chosen spread.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
PATCH = 4
LOGIT_STD = 3.0
"""Spread of q.k/sqrt(d): peaked enough that which keys survive matters, as in trained SD attention."""


def load_photo(name: str) -> torch.Tensor:
    """A bundled scikit-image photo as a float ``[3, H, W]`` tensor in 0..1."""
    try:
        from skimage import data
    except ImportError as error:
        raise SystemExit(
            "The attention benchmark builds its tokens from photographs: pip install scikit-image"
        ) from error
    image = getattr(data, name)()
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0


@functools.lru_cache(maxsize=64)
def photo_tokens(name: str, height: int, width: int, channels: int, seed: int = 0) -> torch.Tensor:
    """``[1, height*width, channels]`` layer-normed tokens of a photo resized to the grid."""
    image = load_photo(name).unsqueeze(0)
    image = F.interpolate(image, size=(height * PATCH, width * PATCH), mode="bilinear", antialias=True)
    patches = F.unfold(image, kernel_size=PATCH, stride=PATCH).transpose(1, 2)  # [1, h*w, 3*PATCH*PATCH]
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(patches.shape[-1], channels, generator=generator) / patches.shape[-1] ** 0.5
    tokens = patches @ projection
    return F.layer_norm(tokens, (channels,))


@dataclass(frozen=True)
class AttentionLayer:
    """Seeded q/k/v projections of one self-attention layer, queries scaled to ``LOGIT_STD``."""

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    heads: int

    @property
    def head_dim(self) -> int:
        return self.w_q.shape[1] // self.heads

    def queries(self, hidden: torch.Tensor) -> torch.Tensor:
        return split_heads(hidden @ self.w_q, self.heads)

    def keys_values(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_heads(hidden @ self.w_k, self.heads), split_heads(hidden @ self.w_v, self.heads)


def attention_layer(hidden: torch.Tensor, heads: int, head_dim: int, seed: int = 1) -> AttentionLayer:
    """Projections for ``hidden``'s width; the query scale is calibrated on a sample of ``hidden``."""
    channels = hidden.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    w_q, w_k, w_v = (torch.randn(channels, heads * head_dim, generator=generator) / channels**0.5 for _ in range(3))
    sample = hidden[:, torch.randperm(hidden.shape[1], generator=generator)[:512]]
    q, k = split_heads(sample @ w_q, heads), split_heads(sample @ w_k, heads)
    logits = q @ k.transpose(-1, -2) / head_dim**0.5
    w_q = w_q * (LOGIT_STD / logits.std().clamp_min(1e-6))
    return AttentionLayer(w_q.to(hidden.dtype), w_k.to(hidden.dtype), w_v.to(hidden.dtype), heads)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
