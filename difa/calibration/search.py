"""The default search: one recorded trajectory, an error table per block cell, a greedy by error per second
saved, and whole-plan checks of the final output. About 10x fewer model forwards than the greedy.

1.-2. **Record** one all-full generation and build its **error table** (calibration/table.py).
3. **Greedy by error per second.** Starting from all-full, repeatedly take the move with the least added error
   per predicted second saved (the measured latency model): a cell moves up the tiers computed -> attention ->
   half -> skipped; recomputing only the changed block's row. This gives a nested sequence of plans from fast to slow,
   with a predicted latency and a table error for each.
4. **Whole-plan checks.** The table ignores how errors propagate through later blocks and steps. Budget mode
   builds up to three plans under the budget, the greedy's, the every-second-step schedule pruned back (or
   extended) to the budget by the same error-per-second rule, and that schedule again with skipped cells only
   (where the candidates hold other tiers), measures each on the final output (one generation each) and keeps
   the one with least error. Threshold mode walks the structured path (all-full, the every-second-step
   schedule's pruning path reversed, then the greedy beyond it): it measures the plan whose table error equals
   the threshold, rescales the table by measured / table, measures the plan that rescaling points to, and keeps
   the fastest measured plan within the threshold (at most two check generations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from difa.calibration.latency import LatencyModel
from difa.calibration.table import ATTN, HALF, RANK, SKIP, Table, tier, tiers
from difa.techniques import REGISTRY
from difa.techniques.protocol import FULL


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
        errors = [measure(c, path) for c, path in zip(options, PATHS)]
        return options[errors.index(min(errors))], seq, checks
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
    ratio = measure(first, PATHS[1]) / max(first.table_error, 1e-12)  # how the table under- or over-states the final error
    second = at(threshold / max(ratio, 1e-12))
    if second is not first and second is not seq[0]:
        measure(second, PATHS[1])
    ok = [c for c in (first, second) if c.measured is not None and c.measured <= threshold]
    if ok:
        return min(ok, key=lambda c: c.predicted), seq, checks
    # neither check passed: step back along the path by the larger of the two ratios, unchecked
    worst = max(c.measured / max(c.table_error, 1e-12) for c in (first, second) if c.measured is not None)
    return at(threshold / worst), seq, checks


def _measurer(check: Callable[[list[list[str]]], float], checks: list[dict]) -> Callable[[Candidate, str], float]:
    """A candidate's measured final-output error, by one check generation (once), recorded in `checks` with the
    path (PATHS) that first proposed it."""
    def measure(c: Candidate, path: str) -> float:
        if c.measured is None:
            c.measured = check(c.rows)
            checks.append({"path": path, "predicted_fraction": round(c.predicted, 4),
                           "table_error": round(c.table_error, 5), "measured_error": round(c.measured, 5),
                           "skipped_cells": _skips(c.rows)})
        return c.measured
    return measure


def budget_options(table: Table, latency: LatencyModel, n_blocks: int, steps: int,
                   methods: Sequence[str] | Sequence[Sequence[str]], budget: float
                   ) -> tuple[list[Candidate], list[Candidate]]:
    """The candidates for one budget, one per path of PATHS (a path that does not reach the budget, or gives the
    same plan as an earlier one, repeats that earlier path's candidate), and the greedy sequence. Each path is one
    fixed sequence of plans, a budget taking the first plan under it, so within one path a larger budget's plan
    computes every cell a smaller one's does."""
    full = latency.fixed_s + steps * latency.step_s

    def under(c: Candidate) -> bool:
        return c.predicted <= budget + 1e-12

    seq = greedy_sequence(table, latency, n_blocks, steps, methods, under, full)
    greedy = seq[-1]
    if not under(greedy):  # every cell skipped and still over budget
        from difa.errors import DifaError

        raise DifaError(f"budget {budget} is below the fastest block plan this model allows (predicted "
                        f"{greedy.predicted:.3f} of full with every block skipped after step 0); raise the budget")
    options = [greedy]
    # A second, structured candidate: the every-second-step schedule, pruned back to the budget or extended to it
    # by the same greedy. The table cannot see how errors propagate, so every candidate is checked on the final
    # output. A third, the same with skipped cells only, where the candidates hold other tiers (CFG halves,
    # attention cells): the plan a block-only search would check, so that the default candidates never check
    # worse than the block cells alone (on the bundled models the table rated CFG cells that then checked worse
    # at some budgets, README "CFG cells").
    only = skips_only(methods, n_blocks)
    for ms in (methods, only):
        if ms is None:
            options.append(options[-1])
            continue
        path = structured_path(table, latency, n_blocks, steps, ms, full, under)
        # (it may never get under the budget: with attention cells that read the step before, the schedule's
        # computed steps cannot take them, and only the greedy's path reaches the budget)
        c = next((c for c in path if under(c)), None)
        options.append(options[-1] if c is None else next((o for o in options if o.rows == c.rows), c))
    return options, seq


PATHS = ("greedy", "structured", "structured, skipped cells only")  # budget_options' candidates, in this order


def skips_only(methods: Sequence[str] | Sequence[Sequence[str]], n_blocks: int) -> list[tuple[str, ...]] | None:
    """Per block, the candidates that skip the block whole; None where that is every candidate already."""
    full_set = per_block(methods, n_blocks)
    only = [tuple(m for m in ms if tier(m) == SKIP) for ms in full_set]
    return None if only == full_set or not any(only) else only


def front(table: Table, latency: LatencyModel, n_blocks: int, steps: int,
          methods: Sequence[str] | Sequence[Sequence[str]], check: Callable[[list[list[str]]], float],
          budgets: Sequence[float]) -> list[tuple[Candidate, list[Candidate], list[dict]]]:
    """One plan per budget (ascending), the front checked as a whole: every budget's candidates are checked, and the
    path (of PATHS) with the least measured error summed over the budgets gives every budget its plan (ties: the
    earlier path). Choosing per budget let the front hop between the paths by noise of a few thousandths on the
    calibration inputs, and on unseen seeds a larger budget then gave a worse plan; one path's plans are nested (a
    larger budget computes every cell a smaller one computes). A path's sum is over the front it delivers: where a
    larger budget's plan checks worse than a smaller one's, the driver keeps the smaller one's
    (calibration/trajectory.py), so the running minimum of its errors is summed. (Summed as checked, the bundled
    DiT's front took the path with CFG cells, whose delivered errors sum to 0.674 against 0.669 for the path of
    skipped cells only: 0.0554 against 0.0540 mean error on 64 unseen images.) Returns (chosen, sequence, checks)
    per budget."""
    rounds = []
    for b in budgets:
        checks: list[dict] = []
        options, seq = budget_options(table, latency, n_blocks, steps, methods, b)
        measure = _measurer(check, checks)
        for c, path in zip(options, PATHS):
            measure(c, path)
        rounds.append((options, seq, checks))
    width = max(len(opts) for opts, _, _ in rounds)
    total = [sum(_running_min([opts[min(k, len(opts) - 1)].measured for opts, _, _ in rounds]))
             for k in range(width)]
    k = total.index(min(total))
    return [(opts[min(k, len(opts) - 1)], seq, checks) for opts, seq, checks in rounds]


def _running_min(errors: Sequence[float]) -> list[float]:
    """[e0, min(e0, e1), ...]: the errors a front delivers once each budget keeps a smaller budget's better plan."""
    out: list[float] = []
    for e in errors:
        out.append(e if not out else min(out[-1], e))
    return out


def _seed_of(seq: Sequence[Candidate], methods: Sequence[Sequence[str]], steps: int) -> Candidate:
    """The every-second-step schedule on the structured path (where its pruning path ends)."""
    want = sum(1 for m in methods if any(tier(k) != ATTN for k in m)) * len(range(1, steps, 2))
    return next(c for c in seq if _skips(c.rows) == want)


def _skips(rows: Sequence[Sequence[str]]) -> int:
    """Cells whose block is skipped or halved (attention cells not counted)."""
    return sum(m != FULL and not (m in REGISTRY and tier(m) == ATTN) for r in rows for m in r)
