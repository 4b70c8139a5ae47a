"""`agent`: agent attention on merged tokens (AgentSD, Han et al. ECCV 2024, LeapLabTHU/Agent-Attention `agentsd/`).

Tokens are merged as in `tome`; a second, more aggressive merge of the same tokens (agent_ratio) gives n agent
tokens, projected with the layer's own `to_q` (no new weights). Then
    O = softmax(Q Aᵀ d^(-k_scale2/2)) · softmax(A Kᵀ d^(-1/2)) V + k_shortcut · V
on the merged tokens, `to_out`, and unmerge. When the agents are not fewer than half the merged tokens
(AgentSD's size check) the layer is plain token merging. Works on diffusers models (the original only on LDM).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from difa.attention.merge import agent_attention, max_merge, merge, rank_sources, take, unmerge
from difa.errors import DifaError
from difa.techniques import tome
from difa.techniques.base import Cell, LayerShape, check_plain, core_flops, project_out, project_qkv, projection_flops
from difa.techniques.protocol import Technique

NAME = "agent"


@dataclass(frozen=True)
class Config:
    ratio: float = 0.4  # AgentSD's first phase: sx = sy = 4, ratio 0.4, agent_ratio 0.95
    sx: int = 4
    sy: int = 4
    agent_ratio: float = 0.95  # agents: N - floor(N * agent_ratio) tokens (capped like ratio)
    k_scale2: float = 0.3
    k_shortcut: float = 0.075
    fp32: bool = False  # AgentSD's attn_precision="fp32" (needed on SD 2.1 in fp16)
    max_downsample: int = 1
    use_rand: bool = True
    seed: int = 0


def check_config(params: Mapping[str, Mapping]) -> None:
    tome.config(params, NAME, Config)


def agents_used(n: int, kept: int, n_agents: int) -> bool:
    return n_agents * 2 < kept  # AgentSD: (N - agent_r) * 2 < N - r


def flops(shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    cfg = Config(**params.get(NAME, {}))
    full = projection_flops(shape) + core_flops(shape, shape.n_q * shape.n_kv)
    if shape.downsample > cfg.max_downsample:
        return full
    kept, n_src, n_dst = tome.kept_tokens(shape, cfg.ratio, cfg.sx, cfg.sy)
    n_agents = shape.n_q - max_merge(n_src, shape.n_q, cfg.agent_ratio)[1]
    merged = dataclasses.replace(shape, n_q=kept, n_kv=kept)
    cost = projection_flops(merged) + tome.matching_flops(shape, n_src, n_dst)
    if not agents_used(shape.n_q, kept, n_agents):
        return cost + core_flops(merged, kept * kept)
    to_q_agents = 2.0 * shape.batch * n_agents * shape.dim * shape.inner
    return cost + to_q_agents + core_flops(merged, 2 * kept * n_agents)


def execute(cell: Cell, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
    check_plain(cell, attention_mask, NAME)
    if encoder_hidden_states is not None:
        raise DifaError(f"{cell.name}: {NAME!r} applies to self-attention only; set this layer to 'full'")
    cfg = tome.config(cell.params, NAME, Config)
    if not 0 <= cfg.agent_ratio < 1:
        raise DifaError(f"agent agent_ratio must be in [0, 1), got {cfg.agent_ratio}")
    x = hidden_states  # (B, N, C)
    parts = tome.partition_for(cfg, cell, x)
    if parts is None:
        return cell.original(cell.attn, x, None, None, *args, **kwargs)
    src, dst = parts
    n = x.shape[1]
    ranking = rank_sources(tome.metric(cell, x), src, dst)
    m = take(ranking, src, dst, max_merge(src.numel(), n, cfg.ratio)[1], n)
    m_agent = take(ranking, src, dst, max_merge(src.numel(), n, cfg.agent_ratio)[1], n)
    xm = merge(x, m)  # (B, N', C)
    if not agents_used(n, m.kept, m_agent.kept):
        out = cell.original(cell.attn, xm, None, None, *args, **kwargs)
        return unmerge(out, m)
    attn = cell.attn
    q, k, v = project_qkv(attn, xm)  # (B, H, N', D)
    a = attn.to_q(merge(x, m_agent))  # (B, n, H*D)
    a = a.view(a.shape[0], -1, attn.heads, q.shape[-1]).transpose(1, 2)  # (B, H, n, D)
    if attn.norm_q is not None:
        a = attn.norm_q(a)
    o = agent_attention(q, k, v, a, cfg.k_scale2, cfg.k_shortcut, cfg.fp32)  # (B, H, N', D)
    return unmerge(project_out(attn, o, xm, q.dtype), m)  # (B, N, C)


TECHNIQUE = Technique(
    NAME, "G", "#8c564b", config=Config, execute=execute, flops=flops, check_config=check_config, **tome.MERGING,
    not_joint="agent tokens are pooled from a 2-D grid of image tokens; the joint sequence also holds text tokens",
    doc="agent attention on merged tokens (AgentSD)")
