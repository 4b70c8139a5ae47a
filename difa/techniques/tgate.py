"""`tgate`: cross-attention gating (T-GATE, Liu et al. 2024, HaozheLiu-ST/T-GATE).

A gated cross-attention layer returns the output it computed at its last computed step, averaged over the
two CFG halves (T-GATE caches (uncond + cond) / 2 at gate_step - 1 and reuses it from then on). Without CFG
it is plain reuse. Once every cross-attention layer of a step is gated, the two CFG halves of the model are
identical, and the engine runs the step on one half only (see Engine: CFG collapse).

On self-attention it is T-GATE's reuse after the gate: the package caches self-attention at gate_step - 1 as
the mean of the halves too, and a self-attention step after the gate that is not recomputed (fi_interval > 1)
returns that mean (or the one-half output of a later recomputed step). The T-GATE preset writes it there;
calibration proposes `tgate` on cross-attention only (CANDIDATE_KINDS), where `ast` would tie with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from difa.errors import DifaError
from difa.techniques.base import Cell, LayerShape

NAME = "tgate"
LETTER = "T"  # one character per cell in the calibration summary
COLOR = "#e377c2"  # its colour in plan heatmaps (difa.plots), the same in every plot
KINDS = ("attn1", "attn2")
AXES = ("spatial", "temporal")  # token axes it runs on: within a frame, across frames (video)
CANDIDATE_KINDS = ("attn2",)  # where calibration proposes it
READS_CACHE = True
NEEDS_METRIC = False
SHARES_CFG = False  # needs the two CFG halves in one batch
READS_OUTPUT = True  # returns the layer's last computed output (the step before must keep it)
READS_RESIDUAL = False  # adds the window residual R of an earlier step
ON_ONE_HALF = None  # what it becomes when the engine runs one CFG half (None: itself)
DEFAULT_CANDIDATE = True
# Why it does not run on a joint (MMDiT) attention layer, as the one phrase `unfit` gives (README: "MMDiT and
# joint attention")
NOT_JOINT = ("T-GATE caches cross-attention once it has converged, and joint attention has no separate "
             "cross-attention (text and image tokens share one softmax and the text stream is updated every step)")


@dataclass(frozen=True)
class Config:
    pass


def flops(shape: LayerShape, params: Mapping[str, Mapping]) -> float:
    return 0.0


def gated(cell: Cell, batch: int) -> torch.Tensor:
    """The cached output averaged over the CFG halves: (B/2, N, C) for a CFG generation, else (B, N, C)."""
    st = cell.state
    if st.gated is not None:
        return st.gated
    out = st.out
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
    st.gated = g
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
