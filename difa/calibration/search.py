"""The default search: one recorded trajectory, an error table per block cell, a greedy by error per second
saved, and whole-plan checks of the final output. About 10x fewer model forwards than the greedy.

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
3. **Greedy by error per second.** Starting from all-full, repeatedly take the move with the least added error
   per predicted second saved (the measured latency model): a cell moves up the tiers computed -> attention ->
   half -> skipped; recomputing only the changed block's row. This gives a nested sequence of plans from fast to slow,
   with a predicted latency and a table error for each.
4. **Whole-plan checks.** The table ignores how errors propagate through later blocks and steps. Budget mode
   builds two plans under the budget, the greedy's and the every-second-step schedule pruned back (or extended)
   to the budget by the same error-per-second rule, measures both on the final output (one generation each)
   and keeps the one with less error. Threshold mode walks the structured path (all-full, the every-second-step
   schedule's pruning path reversed, then the greedy beyond it): it measures the plan whose table error equals
   the threshold, rescales the table by measured / table, measures the plan that rescaling points to, and keeps
   the fastest measured plan within the threshold (at most two check generations).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from difa.calibration.latency import LatencyModel
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
        if not t.half_batch:
            guess = t.estimate([(u, res[u]) for u in used], s, cfg)  # (B, n, C) on the sampled tokens
            return float((guess - res[s]).abs().sum()) / self.traj.scale[j][s]
        if self.cond is None:
            return float("inf")  # no CFG batch to halve
        h = self.cond  # (computed half, other half) points, then this step's computed half; the computed half is exact
        o = other_half(h, res[s].shape[0])
        points = [(u, (res[u][h], res[u][o])) for u in used] + [(s, (res[s][h], None))]
        return float((t.estimate(points, s, cfg) - res[s][o]).abs().sum()) / self.traj.scale[j][s]  # (B/2, n, C)

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


@dataclass
class Candidate:
    rows: list[list[str]]  # (n_blocks, steps)
    table_error: float
    predicted: float  # fraction of the all-full generation's seconds
    measured: float | None = None  # final-output error of a check generation


def greedy_sequence(table: Table, latency: LatencyModel, n_blocks: int, steps: int, methods: Sequence[str],
                    stop: Callable[[Candidate], bool], full_seconds: float,
                    seed: Sequence[set[int]] | None = None) -> list[Candidate]:
    """Plans from `seed` (skipped steps per block; default all-full) to `stop`, one more skipped cell each, the
    cell with least added error per predicted second saved.

    Moves are taken in rounds of growing staleness: first only cells whose block was computed the step before,
    then two steps before, and so on. Without the rounds the greedy strings early skips together (the table
    sees small steps there), and errors that compound over the remaining steps make such plans far worse than
    an every-second-step schedule at the same latency (measured on the bundled DiT: 0.12 vs 0.035)."""
    methods = per_block(methods, n_blocks)
    skipped: list[dict[int, str]] = [tiers(x) for x in seed] if seed is not None else [{} for _ in range(n_blocks)]
    levels = [[v for v in (ATTN, HALF, SKIP) if any(tier(m) == v for m in ms)] for ms in methods]  # cheapest saving first
    rows, errs = [], []
    for j in range(n_blocks):
        e, row, _ = table.row(j, steps, skipped[j], methods[j])
        errs.append(e)
        rows.append(row)
    cost = [latency.row_seconds(j, rows[j]) for j in range(n_blocks)]
    best: list[tuple[float, int, str, float] | None] = [None] * n_blocks  # per block: (ratio, step, tier, error)
    max_stale = [max([table.row(j, steps, skipped[j], methods[j])[2] for j in range(n_blocks)] + [1])]

    def refresh(j: int) -> None:
        choice = None
        for s in range(1, steps) if methods[j] else ():  # a block with no methods allowed stays computed
            now = skipped[j].get(s)
            for level in levels[j]:  # a cell moves up the tiers only: computed -> attention -> half -> skipped
                if RANK[level] <= RANK[now]:
                    continue
                e, row, stale = table.row(j, steps, {**skipped[j], s: level}, methods[j])
                saved = cost[j] - latency.row_seconds(j, row)  # the cell, less any residual its skip makes cached
                if stale > max_stale[0] or saved <= 0 or row[s] == FULL:
                    continue
                ratio = (e - errs[j]) / saved
                if choice is None or ratio < choice[0]:
                    choice = (ratio, s, level, e)
        best[j] = choice

    for j in range(n_blocks):
        refresh(j)
    out = [Candidate([list(r) for r in rows], sum(errs), fraction(latency, rows, steps, full_seconds))]
    while not stop(out[-1]):
        options = [(b[0], j) for j, b in enumerate(best) if b is not None]
        if not options:
            if max_stale[0] >= steps:
                break
            max_stale[0] += 1  # next round: allow one more step between a skipped cell and its last computed one
            for k in range(n_blocks):
                refresh(k)
            continue
        _, j = min(options)
        _, s, level, e = best[j]
        skipped[j][s] = level
        errs[j] = e
        _, rows[j], _ = table.row(j, steps, skipped[j], methods[j])
        cost[j] = latency.row_seconds(j, rows[j])
        out.append(Candidate([list(r) for r in rows], sum(errs), fraction(latency, rows, steps, full_seconds)))
        refresh(j)
    return out


def prune_path(table: Table, latency: LatencyModel, n_blocks: int, steps: int, methods: Sequence[str],
               seed: Sequence[set[int]], full_seconds: float) -> list[Candidate]:
    """From `seed` back to all-full, giving back one cell's time at a time, the move that removes most table error
    per second given back first: a skipped cell computed again, or computed on one CFG half where the block may
    take a half cell (a half cell then computed again later): plans from fast to slow."""
    methods = per_block(methods, n_blocks)
    halves = [any(tier(m) == HALF for m in ms) for ms in methods]
    skipped = [tiers(x) for x in seed]
    errs = [table.row(j, steps, skipped[j], methods[j])[0] for j in range(n_blocks)]

    def snapshot() -> Candidate:
        rows = [table.row(j, steps, skipped[j], methods[j])[1] for j in range(n_blocks)]
        return Candidate(rows, sum(errs), fraction(latency, rows, steps, full_seconds))

    out = [snapshot()]
    while any(skipped):
        choice = None
        for j in range(n_blocks):
            now = latency.row_seconds(j, table.row(j, steps, skipped[j], methods[j])[1])
            for s, level in skipped[j].items():
                rest = {k: v for k, v in skipped[j].items() if k != s}
                for cells in (rest, {**rest, s: HALF}) if level == SKIP and halves[j] else (rest,):
                    e, row, _ = table.row(j, steps, cells, methods[j])
                    ratio = (errs[j] - e) / max(latency.row_seconds(j, row) - now, 1e-12)
                    if choice is None or ratio > choice[0]:
                        choice = (ratio, j, cells, e)
        _, j, skipped[j], errs[j] = choice
        out.append(snapshot())
    return out


def fraction(latency: LatencyModel, rows: Sequence[Sequence[str]], steps: int, full_seconds: float) -> float:
    """Predicted fraction of the all-full generation for block rows (attention all full): as LatencyModel.predict."""
    seconds = full_seconds - sum(steps * latency.block_s[j] - latency.row_seconds(j, r) for j, r in enumerate(rows))
    return seconds / full_seconds


def structured_path(table: Table, latency: LatencyModel, n_blocks: int, steps: int, methods: Sequence[str],
                    full_seconds: float, stop: Callable[[Candidate], bool]) -> list[Candidate]:
    """Plans from all-full to the every-second-step schedule (its pruning path, reversed), then beyond it by the
    greedy until `stop`: slow to fast."""
    seed = [dict.fromkeys(x, SKIP if any(tier(k) == SKIP for k in m) else HALF) if any(tier(k) != ATTN for k in m)
            else {}
            for x, m in zip(alternating(n_blocks, steps), per_block(methods, n_blocks))]
    slower = prune_path(table, latency, n_blocks, steps, methods, seed, full_seconds)[::-1]
    faster = greedy_sequence(table, latency, n_blocks, steps, methods, stop, full_seconds, seed)
    return slower + faster[1:]


def per_block(methods: Sequence[str] | Sequence[Sequence[str]], n_blocks: int) -> list[tuple[str, ...]]:
    """The methods each block may take: one list for all blocks, or one per block (a cache cap: calibration/cache_cap.py)."""
    if methods and not isinstance(methods[0], str):
        return [tuple(m) for m in methods]
    return [tuple(methods)] * n_blocks


def alternating(n_blocks: int, steps: int) -> list[set[int]]:
    """Every block skipped at every second step (1, 3, 5, ...): the uniform schedule that, forecast, beat
    FirstBlockCache by a third on the bundled DiT (DESIGN.md §5)."""
    return [set(range(1, steps, 2)) for _ in range(n_blocks)]


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


def search(table: Table, latency: LatencyModel, n_blocks: int, steps: int, methods: Sequence[str] | Sequence[Sequence[str]],
           check: Callable[[list[list[str]]], float], *, budget: float | None = None,
           threshold: float | None = None) -> tuple[Candidate, list[Candidate], list[dict]]:
    """Budget mode (least table error with predicted fraction <= budget) or threshold mode (fastest plan whose
    measured final-output error is <= threshold). `check(rows)` runs one generation and returns its error."""
    full = latency.fixed_s + steps * latency.step_s
    checks: list[dict] = []

    measure = _measurer(check, checks)

    if budget is not None:
        options, seq = budget_options(table, latency, n_blocks, steps, methods, budget)
        return min(options, key=measure), seq, checks
    assert threshold is not None
    # Threshold mode walks the structured path (all-full -> every second step -> beyond): on the bundled models
    # its plans had less error at equal latency than the greedy's from all-full (experiments/README.md).
    seq = structured_path(table, latency, n_blocks, steps, methods, full, lambda c: False)
    if threshold <= 0:
        return seq[0], seq, checks

    def at(limit: float) -> Candidate:
        fits = [c for c in seq if c.table_error <= limit]
        return fits[-1] if fits else seq[0]

    first = _seed_of(seq, per_block(methods, n_blocks), steps)  # checked first: the anchor the table's error is rescaled by
    ratio = measure(first) / max(first.table_error, 1e-12)  # how the table under- or over-states the final error
    second = at(threshold / max(ratio, 1e-12))
    if second is not first and second is not seq[0]:
        measure(second)
    ok = [c for c in (first, second) if c.measured is not None and c.measured <= threshold]
    if ok:
        return min(ok, key=lambda c: c.predicted), seq, checks
    # neither check passed: step back along the path by the larger of the two ratios, unchecked
    worst = max(c.measured / max(c.table_error, 1e-12) for c in (first, second) if c.measured is not None)
    return at(threshold / worst), seq, checks


def _measurer(check: Callable[[list[list[str]]], float], checks: list[dict]) -> Callable[[Candidate], float]:
    """A candidate's measured final-output error, by one check generation (once), recorded in `checks`."""
    def measure(c: Candidate) -> float:
        if c.measured is None:
            c.measured = check(c.rows)
            checks.append({"predicted_fraction": round(c.predicted, 4), "table_error": round(c.table_error, 5),
                           "measured_error": round(c.measured, 5), "skipped_cells": _skips(c.rows)})
        return c.measured
    return measure


def budget_options(table: Table, latency: LatencyModel, n_blocks: int, steps: int,
                   methods: Sequence[str] | Sequence[Sequence[str]], budget: float
                   ) -> tuple[list[Candidate], list[Candidate]]:
    """The candidates for one budget, [from the greedy path, from the structured path] (the second only where it
    fits and differs), and the greedy sequence. Each path is one fixed sequence of plans, a budget taking the first
    plan under it, so within one path a larger budget's plan computes every cell a smaller one's does."""
    full = latency.fixed_s + steps * latency.step_s

    def under(c: Candidate) -> bool:
        return c.predicted <= budget + 1e-12

    seq = greedy_sequence(table, latency, n_blocks, steps, methods, under, full)
    greedy = seq[-1]
    if not under(greedy):  # every cell skipped and still over budget
        from difa.errors import DifaError

        raise DifaError(f"budget {budget} is below the fastest block plan this model allows (predicted "
                        f"{greedy.predicted:.3f} of full with every block skipped after step 0); raise the budget")
    # A second, structured candidate: the every-second-step schedule, pruned back to the budget or extended to it
    # by the same greedy. The table cannot see how errors propagate, so both are checked on the final output.
    path = structured_path(table, latency, n_blocks, steps, methods, full, under)
    # (it may never get under the budget: with attention cells that read the step before, the schedule's
    # computed steps cannot take them, and only the greedy's path reaches the budget)
    other = next((c for c in path if under(c)), None)
    return [greedy] + ([other] if other is not None and other.rows != greedy.rows else []), seq


def front(table: Table, latency: LatencyModel, n_blocks: int, steps: int,
          methods: Sequence[str] | Sequence[Sequence[str]], check: Callable[[list[list[str]]], float],
          budgets: Sequence[float]) -> list[tuple[Candidate, list[Candidate], list[dict]]]:
    """One plan per budget (ascending), the front checked as a whole: every budget's candidates are checked, and
    the path (greedy or structured) with the least measured error summed over the budgets gives every budget its
    plan. Choosing per budget let the front hop between the paths by noise of a few thousandths on the
    calibration inputs, and on unseen seeds a larger budget then gave a worse plan; one path's plans are nested
    (a larger budget computes every cell a smaller one computes). Returns (chosen, sequence, checks) per budget."""
    rounds = []
    for b in budgets:
        checks: list[dict] = []
        options, seq = budget_options(table, latency, n_blocks, steps, methods, b)
        for c in options:
            _measurer(check, checks)(c)
        rounds.append((options, seq, checks))
    total = [sum(opts[min(k, len(opts) - 1)].measured for opts, _, _ in rounds) for k in (0, 1)]
    k = 0 if total[0] <= total[1] else 1
    return [(opts[min(k, len(opts) - 1)], seq, checks) for opts, seq, checks in rounds]


def _seed_of(seq: Sequence[Candidate], methods: Sequence[Sequence[str]], steps: int) -> Candidate:
    """The every-second-step schedule on the structured path (where its pruning path ends)."""
    want = sum(1 for m in methods if any(tier(k) != ATTN for k in m)) * len(range(1, steps, 2))
    return next(c for c in seq if _skips(c.rows) == want)


def _skips(rows: Sequence[Sequence[str]]) -> int:
    """Cells whose block is skipped or halved (attention cells not counted)."""
    return sum(m != FULL and not (m in REGISTRY and tier(m) == ATTN) for r in rows for m in r)
