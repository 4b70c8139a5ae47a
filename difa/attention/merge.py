"""Token merging math: ToMe for SD's bipartite soft matching (Bolya & Hoffman 2023, dbolya/tomesd) and the
agent attention of AgentSD (Han et al. 2024, LeapLabTHU/Agent-Attention `agentsd/`). Pure functions, no state.

Tokens are raster-flattened over an h x w grid. Differences from tomesd, on purpose:
- source and destination tokens are listed in raster order (tomesd's order comes from an unstable argsort), and
  sources are ranked with a stable sort, so ties resolve to the lower token index;
- the random destination pick comes from whatever generator the caller passes (difa seeds one per layer and step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Match:
    """One bipartite soft matching of a batch, shared by merge() and unmerge()."""

    src: torch.Tensor  # (Ns,) token indices of the sources
    dst: torch.Tensor  # (Nd,) token indices of the destinations
    unmerged: torch.Tensor  # (B, Ns - r) positions in `src` of the sources kept, most similar first
    merged: torch.Tensor  # (B, r) positions in `src` of the sources merged away
    target: torch.Tensor  # (B, r) position in `dst` each merged source goes to
    n: int  # N, tokens before merging

    @property
    def r(self) -> int:
        return self.merged.shape[1]

    @property
    def kept(self) -> int:
        """Tokens after merging: N - r."""
        return self.n - self.r


def partition(h: int, w: int, sx: int, sy: int, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(src (Ns,), dst (Nd,)) token indices of an h x w grid: one destination per whole sy x sx cell, the
    top-left one when `generator` is None, else a uniformly random one; every other token is a source.
    Rows and columns past the last whole cell are all sources (as tomesd)."""
    hs, ws = h // sy, w // sx
    if generator is None:
        pick = torch.zeros(hs, ws, dtype=torch.long)
    else:
        pick = torch.randint(sy * sx, (hs, ws), generator=generator)  # (hs, ws) position inside each cell
    rows = torch.arange(hs)[:, None] * sy + pick // sx  # (hs, ws)
    cols = torch.arange(ws)[None, :] * sx + pick % sx
    is_dst = torch.zeros(h * w, dtype=torch.bool)
    is_dst[(rows * w + cols).flatten()] = True
    return (~is_dst).nonzero().squeeze(1).to(device), is_dst.nonzero().squeeze(1).to(device)


def max_merge(n_src: int, n: int, ratio: float) -> tuple[int, int]:
    """(r asked = floor(N * ratio), r possible = min(r, Ns)): tomesd silently caps r at the number of sources."""
    asked = int(n * ratio)
    return asked, min(asked, n_src)


def rank_sources(metric: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each source picks its most cosine-similar destination. metric: (B, N, C).
    Returns (order (B, Ns): positions in `src`, most similar first; target (B, Ns): each source's best destination)."""
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)  # (B, N, C)
        scores = unit[:, src] @ unit[:, dst].transpose(-1, -2)  # (B, Ns, Nd)
        best, target = scores.max(dim=-1)  # (B, Ns)
        return best.argsort(dim=-1, descending=True, stable=True), target


def take(ranking: tuple[torch.Tensor, torch.Tensor], src: torch.Tensor, dst: torch.Tensor, r: int, n: int) -> Match:
    """The Match that merges the r most similar sources of `ranking` (r capped at the number of sources)."""
    order, target = ranking
    r = max(0, min(r, src.numel()))
    merged = order[:, :r]  # (B, r)
    return Match(src, dst, order[:, r:], merged, target.gather(1, merged), n)


def bipartite_match(metric: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, r: int) -> Match:
    """ToMe's bipartite soft matching: the r sources most similar to a destination merge into it. metric: (B, N, C)."""
    return take(rank_sources(metric, src, dst), src, dst, r, metric.shape[1])


def _rows(index: torch.Tensor, c: int) -> torch.Tensor:
    return index[..., None].expand(*index.shape, c)  # (B, K) -> (B, K, C)


def merge(x: torch.Tensor, m: Match) -> torch.Tensor:
    """(B, N, C) -> (B, N - r, C): [kept sources in `m.unmerged` order, destinations averaged with their sources]."""
    c = x.shape[-1]
    xs, xd = x[:, m.src], x[:, m.dst]  # (B, Ns, C), (B, Nd, C)
    kept = xs.gather(1, _rows(m.unmerged, c))
    moved = xs.gather(1, _rows(m.merged, c))  # (B, r, C)
    xd = xd.scatter_reduce(1, _rows(m.target, c), moved, reduce="mean", include_self=True)
    return torch.cat([kept, xd], dim=1)


def unmerge(y: torch.Tensor, m: Match) -> torch.Tensor:
    """(B, N - r, C) -> (B, N, C): every merged source takes its destination's value."""
    b, _, c = y.shape
    n_kept = m.unmerged.shape[1]
    kept, yd = y[:, :n_kept], y[:, n_kept:]  # (B, Ns - r, C), (B, Nd, C)
    out = y.new_empty(b, m.n, c)
    out[:, m.dst] = yd
    out.scatter_(1, _rows(m.src[m.unmerged], c), kept)
    out.scatter_(1, _rows(m.src[m.merged], c), yd.gather(1, _rows(m.target, c)))
    return out


def token_grid(latent_hw: tuple[int, int], n_tokens: int, patch: int | None) -> tuple[int, int, int]:
    """(h, w, downsample) of the token grid of a layer. UNet (patch None): the layer's downsampling is
    ceil(sqrt(H*W // N)) of the latent H x W and the grid ceil(H/ds) x ceil(W/ds), as tomesd; transformers:
    the (H/p) x (W/p) patch grid at downsample 1."""
    hh, ww = latent_hw
    if patch is not None:
        return hh // patch, ww // patch, 1
    ds = int(math.ceil(math.sqrt(hh * ww // n_tokens)))
    return int(math.ceil(hh / ds)), int(math.ceil(ww / ds)), ds


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor,
                    k_scale2: float = 0.3, k_shortcut: float = 0.075, fp32: bool = False) -> torch.Tensor:
    """AgentSD: O = softmax(Q Aᵀ d^(-k_scale2/2)) · softmax(A Kᵀ d^(-1/2)) V + k_shortcut · V.

    q, k, v: (B, H, N, D); agents: (B, H, n, D) (agent tokens already through to_q). Returns (B, H, N, D).
    Cost O(2·N·n·D) instead of O(N²·D). `fp32` runs both softmaxes in float32 (AgentSD's attn_precision).
    """
    d = q.shape[-1]
    dtype = v.dtype
    if fp32:
        q, k, agents = q.float(), k.float(), agents.float()
        v = v.float()
    agent_v = F.scaled_dot_product_attention(agents, k, v, scale=d ** -0.5)  # (B, H, n, D)
    out = F.scaled_dot_product_attention(q, agents, agent_v, scale=d ** (-0.5 * k_scale2))  # (B, H, N, D)
    return (out + k_shortcut * v).to(dtype)
