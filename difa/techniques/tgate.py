"""`tgate`: cross-attention gating (T-GATE, Liu et al. 2024, HaozheLiu-ST/T-GATE).

A gated cross-attention layer returns the output it computed at its last computed step, averaged over the
two CFG halves (T-GATE caches (uncond + cond) / 2 at gate_step - 1 and reuses it from then on). Without CFG
it is plain reuse. Once every cross-attention layer of a step is gated, the two CFG halves of the model are
identical, and the engine runs the step on one half only (see Engine: CFG collapse).

On self-attention it is T-GATE's reuse after the gate: the package caches self-attention at gate_step - 1 as
the mean of the halves too, and a self-attention step after the gate that is not recomputed (fi_interval > 1)
returns that mean (or the one-half output of a later recomputed step). The T-GATE preset writes it there;
calibration proposes `tgate` on cross-attention only (candidate_kinds), where `ast` would tie with it.
"""

from __future__ import annotations

import torch

from difa.errors import DifaError
from difa.techniques.base import OUT, Cell
from difa.techniques.protocol import LAYER, Slot, Technique

NAME = "tgate"
GATED = "gated"
# (B/2, N, C) with CFG, else (B, N, C): the layer's last computed output averaged over the CFG halves; a memo of OUT
GATED_SLOT = Slot(GATED, LAYER, "technique", lambda s, cfg: (s.batch // 2 if cfg else s.batch) * s.n_q * s.dim,
                  fit_batch=False, derived_from=OUT, doc="T-GATE's CFG mean of the last output")


def gated(cell: Cell, batch: int) -> torch.Tensor:
    """The cached output averaged over the CFG halves: (B/2, N, C) for a CFG generation, else (B, N, C)."""
    st = cell.state
    if st.get(GATED) is not None:
        return st.get(GATED)
    out = st.get(OUT)
    if out is None:
        raise DifaError(f"{cell.name} step {cell.step}: 'tgate' has no earlier output to reuse; "
                        "the layer must compute at an earlier step")
    cfg = cell.collapsed or cell.cond is not None
    if cfg and out.shape[0] == (batch if cell.collapsed else batch // 2):
        g = out  # cached while collapsed: already one (shared) half
    elif cfg:
        h = out.shape[0] // 2
        g = (out[:h] + out[h:]) / 2  # (B/2, N, C), symmetric in the halves, so layout-free
    else:
        g = out
    st.slots[GATED] = g
    return g


def execute(cell: Cell, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
    b = hidden_states.shape[0]
    g = gated(cell, b)
    if cell.cond is not None and not cell.collapsed:
        g = torch.cat([g, g], dim=0)  # (B, N, C): both halves get the mean
    if g.shape[0] != b or g.shape[1] != hidden_states.shape[1]:
        raise DifaError(f"{cell.name} step {cell.step}: 'tgate' cached {tuple(g.shape[:2])} (batch, tokens) but this "
                        f"call has {(b, hidden_states.shape[1])}; keep batch and resolution fixed in a generation")
    return g


TECHNIQUE = Technique(
    NAME, "T", "#e377c2", ("attn1", "attn2"), execute=execute, reads=(OUT,), holds=(GATED,), averages_halves=True,
    collapses_cfg=True, candidate=True, candidate_kinds=("attn2",), slots=(GATED_SLOT,),
    not_joint=("T-GATE caches cross-attention once it has converged, and joint attention has no separate "
               "cross-attention (text and image tokens share one softmax and the text stream is updated every step)"),
    doc="cross-attention gating: the CFG mean of the last output")
