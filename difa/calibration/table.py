"""The default search's inputs (the search itself: calibration/search.py):

1. **Record** one all-full generation on the calibration inputs (S denoiser forwards), keeping every block's
   residual contribution r[j][s] = output - input on a fixed sample of tokens, and the final output.
2. **Error table.** Skipping block j at step s while its last computed steps are ... s0 < s1 leaves an error
   |r̂ - r[j][s]| / |output[j][s]| (sum-normalized L1 on the sampled tokens), where r̂ is each candidate
   technique's own estimator (`Technique.estimate`, the function the engine runs) on the recorded residuals of
   the last `points` computed steps (r1 for `reuse`; r1 + (r1 - r0)(s - s1)/(s1 - s0) for a first-order
   `forecast`). The table is exact for the recorded trajectory and captures staleness (how far back s1 is), which
   one-shot "skip one cell" sensitivities miss (DESIGN.md §5). A CFG cell (`Technique.half_batch`: the block
   computed on the conditional half) errs only on the other half: its estimator gets the recorded halves. An
   attention cell (the block computed, its attention layers on a cheaper method) takes the error its block showed
   when rerun so on the recorded caches (calibration/attention_cells.py). Each cell takes the best method of its
   tier (attention, half or skipped; ties: the candidates' order).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from difa.collapse import other_half
from difa.techniques import REGISTRY
from difa.techniques.protocol import FULL


MAX_TOKENS = 512  # tokens sampled per block for the error table (memory: blocks x steps x batch x 512 x C)


def final_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum |a - b| / sum |b| over the whole output (b the all-full reference), as `difa.evaluate`'s rel_l1."""
    a, b = a.double(), b.double()
    return float((a - b).abs().sum() / b.abs().sum().clamp_min(1e-12))


@dataclass
class Trajectory:
    residual: list[dict[int, torch.Tensor]]  # [block] step -> (B, n, C) residual on the sampled tokens
    scale: list[dict[int, float]]  # [block] step -> sum |block output| on the sampled tokens
    final: torch.Tensor  # the generation's output (images or latents)
    wall_s: float = 0.0
    denoiser_s: float = 0.0
    forwards: int = 0
    # seconds the pipeline spends outside the denoiser (text encoder, scheduler, latents), from a warm run: the
    # recorded generation is the process's first and pays one-time costs there (see calibration/trajectory.py)
    remainder_s: float | None = None

    @property
    def outside_s(self) -> float:
        return self.remainder_s if self.remainder_s is not None else max(self.wall_s - self.denoiser_s, 0.0)

    @staticmethod
    def sample(t: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, n, C): the tokens the table is kept on (evenly spaced, at most MAX_TOKENS)."""
        n = t.shape[-2]
        return t.detach()[..., torch.linspace(0, n - 1, min(n, MAX_TOKENS)).round().long(), :].float()

    def observe(self, j: int, step: int, x: torch.Tensor, out: torch.Tensor) -> None:
        o = self.sample(out)
        self.residual[j][step] = o - self.sample(x)
        self.scale[j][step] = float(o.abs().sum().clamp_min(1e-12))


# a cell's tier: the block computed with a cheaper attention method (calibration/attention_cells.py), computed on
# one CFG half (Technique.half_batch), or skipped; in this order a cell may only move up (RANK)
ATTN, HALF, SKIP = "attn", "half", "skip"
RANK = {None: 0, ATTN: 1, HALF: 2, SKIP: 3}


def tier(method: str) -> str:
    t = REGISTRY[method]
    return ATTN if not t.is_block else HALF if t.half_batch else SKIP


def tiers(cells: set[int] | Mapping[int, str]) -> dict[int, str]:
    """Step -> tier of a block row's cells that are not computed whole (a set: every one skipped)."""
    return dict(cells) if isinstance(cells, Mapping) else dict.fromkeys(cells, SKIP)


@dataclass
class Table:
    """Cell errors of one recorded trajectory, memoized. `params`: the plan's technique table (each estimator gets
    its technique's Config). `cond`: the conditional rows of the recorded CFG batch (None: no CFG batch), which a
    `half_batch` technique computes; its error is the other half's."""

    traj: Trajectory
    memo: dict = field(default_factory=dict)
    params: Mapping[str, Mapping] = field(default_factory=dict)
    cond: slice | None = None
    # (block, step, attention method) -> the block's output error with that attention cell (attention_cells.score)
    attn: Mapping[tuple[int, int, str], float] = field(default_factory=dict)

    def error(self, j: int, s: int, history: Sequence[int], method: str) -> float:
        t = REGISTRY[method]
        if not t.is_block:  # an attention cell: scored on the recorded caches of the step before
            return self.attn.get((j, s, method), float("inf"))
        used = tuple(history[-t.points:])  # the computed steps its estimator reads
        key = (j, s, method, used)
        if key not in self.memo:
            self.memo[key] = self._error(j, s, used, t)
        return self.memo[key]

    def _error(self, j: int, s: int, used: tuple[int, ...], t) -> float:
        """Sum |stand-in - recorded| over both CFG halves / sum |output|. (Weighing the halves as the sampler's
        u + g (c - u) does, |1 - g| and g, was measured worse on unseen seeds: see the README's CFG cells.)"""
        res, cfg = self.traj.residual[j], t.cfg(self.params)
        if t.fit is not None:
            return self._cross_fitted(res, s, used, t) / self.traj.scale[j][s]
        if not t.half_batch:
            guess = t.estimate([(u, res[u]) for u in used], s, cfg)  # (B, n, C) on the sampled tokens
            return float((guess - res[s]).abs().sum()) / self.traj.scale[j][s]
        if self.cond is None:
            return float("inf")  # no CFG batch to halve
        h = self.cond  # (computed half, other half) points, then this step's computed half; the computed half is exact
        o = other_half(h, res[s].shape[0])
        points = [(u, (res[u][h], res[u][o])) for u in used] + [(s, (res[s][h], None))]
        return float((t.estimate(points, s, cfg) - res[s][o]).abs().sum()) / self.traj.scale[j][s]  # (B/2, n, C)

    def _folds(self, batch: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Two folds of the recorded (batch, n, C) residuals as (row mask, token mask): the calibration inputs split
        by parity (an input's CFG halves together); with one input, the sampled tokens by parity."""
        inputs = batch // 2 if self.cond is not None and batch % 2 == 0 else batch
        if inputs >= 2:
            even = (torch.arange(batch) % inputs) % 2 == 0
            return [(even, torch.ones(n, dtype=torch.bool)), (~even, torch.ones(n, dtype=torch.bool))]
        even = torch.arange(n) % 2 == 0
        return [(torch.ones(batch, dtype=torch.bool), even), (torch.ones(batch, dtype=torch.bool), ~even)]

    def fold_fits(self, t, points: list, s: int, target: torch.Tensor) -> list:
        """[(rows, tokens, parameters fitted on the other fold)] for each fold (`_folds`) of the recorded points
        and target (B, n, C): what the table scores and what the check generation runs (CheckFit)."""
        folds = self._folds(*target.shape[:2])
        return [(rows, toks, t.fit([(u, r[other][:, other_toks]) for u, r in points], s,
                                   target[other][:, other_toks]))
                for (rows, toks), (other, other_toks) in zip(folds, folds[::-1])]

    def _cross_fitted(self, res: Mapping[int, torch.Tensor], s: int, used: tuple[int, ...], t) -> float:
        """Sum |stand-in - recorded| of a fitted technique, each fold scored with the parameters fitted on the other
        (fitted and scored on the same inputs, the table would prefer it wherever it has parameters to spare)."""
        total = 0.0
        for rows, toks, params in self.fold_fits(t, [(u, res[u]) for u in used], s, res[s]):
            guess = t.estimate([(u, res[u][rows][:, toks]) for u in used], s, params)  # (b, n', C)
            total += float((guess - res[s][rows][:, toks]).abs().sum())
        return total

    def check_fit(self, method: str) -> "CheckFit":
        return CheckFit(self, REGISTRY[method])

    def row(self, j: int, steps: int, cells: set[int] | Mapping[int, str],
            methods: Sequence[str]) -> tuple[float, list[str], int]:
        """Table error of block j's row with `cells` not computed whole (step -> tier; a set: skipped), each cell's
        best method of its tier, and the row's staleness (the most steps any such cell is away from its last
        computed step). A half cell is not a computed step: later cells read the step before it. An attention cell
        is one (the block runs); where its method reads a cache, the step before must be computed in full (the
        age its error was scored at), and no method of the tier: the cell stays computed."""
        cells = tiers(cells)
        total, history, row, stale = 0.0, [], [], 0
        # a block with a half cell takes no attention cell: its attention layers stay full throughout (plan.validate)
        halved = HALF in cells.values() and any(tier(m) == HALF for m in methods)
        for s in range(steps):
            level = cells.get(s)
            options = [m for m in methods if tier(m) == level] if level and history else []
            if level == ATTN:
                ready = row[-1:] == [FULL] and not halved
                errs = {m: self.error(j, s, history, m) for m in options
                        if not halved and (ready or not REGISTRY[m].reads)}
                errs = {m: e for m, e in errs.items() if e < float("inf")}
                best = min(errs, key=errs.get) if errs else FULL
                total += errs.get(best, 0.0)
                history.append(s)
                row.append(best)
            elif options:
                stale = max(stale, s - history[-1])
                errs = {m: self.error(j, s, history, m) for m in options}
                best = min(errs, key=errs.get)
                total += errs[best]
                row.append(best)
            else:
                history.append(s)
                row.append(FULL)
        return total, row, stale



@dataclass(repr=False)
class CheckFit:
    """A fitted technique's parameters for a plan's check generation (the technique's Config calls it as
    `(block, step, x, points)` in place of its table): at each of its cells, fitted on the recorded all-full
    residuals at the cell's own last computed steps (the steps of `points`), each fold of inputs (`Table._folds`)
    run with the parameters fitted on the other, so the measured error is out of sample like the table's; `fits`
    keeps the fit on every input, the plan's. (Fitted instead along the plan's own trajectory, toward the
    all-full block output, the stand-ins chased the drift and the bundled DiT's fronts measured 0.08-0.8 unseen.)"""

    table: Table
    technique: object
    fits: dict = field(default_factory=dict)  # (block, step) -> parameters (P, C) fitted on every input

    def __repr__(self) -> str:  # (not the recorded trajectory's tensors)
        return f"CheckFit({getattr(self.technique, 'name', '?')}, {len(self.fits)} cells)"

    def __call__(self, j: int, s: int, x: torch.Tensor, points: list) -> torch.Tensor:
        res, t = self.table.traj.residual[j], self.technique
        pts, target = [(u, res[u]) for u, _ in points], res[s]  # (B, n, C) recorded, on the table's tokens
        whole = self.fits[(j, s)] = t.fit(pts, s, target)  # (P, C)
        fits = self.table.fold_fits(t, pts, s, target)
        if not fits[0][1].all():  # one input: folds of tokens, which rows cannot take; in-sample
            return whole[:, None, None, :].expand(-1, x.shape[0], 1, -1).to(x)
        per_row = whole.new_zeros(whole.shape[0], x.shape[0], 1, whole.shape[1])
        for rows, _, p in fits:
            per_row[:, rows, 0, :] = p[:, None, :]  # (P, C) of the other fold
        return per_row.to(x)  # (P, B, 1, C): each batch row's parameters


def record(run: Callable[..., torch.Tensor], model: torch.nn.Module, n_blocks: int) -> Trajectory:
    """One generation through `run(on_block=...)`, timing the denoiser calls against the whole call."""
    traj = Trajectory([{} for _ in range(n_blocks)], [{} for _ in range(n_blocks)], torch.empty(0))
    spent, started = [0.0], [0.0]

    def pre(module, args):
        started[0] = time.perf_counter()
        traj.forwards += 1

    def post(module, args, output):
        spent[0] += time.perf_counter() - started[0]

    handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    t0 = time.perf_counter()
    try:
        traj.final = run(on_block=traj.observe)
    finally:
        for h in handles:
            h.remove()
    traj.wall_s = time.perf_counter() - t0
    traj.denoiser_s = spent[0]
    return traj
