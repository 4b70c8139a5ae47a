"""Collect `python -m difa.evaluate -m ...` outputs into one CSV, a markdown table and Pareto plots.

    python experiments/collect.py multirun/evaluate/<sweep dir> [more dirs] --out experiments/results
    python experiments/collect.py --plan plans/fmnist_dit_d0.05_s20.json --out experiments/results   # heatmap only

Every Hydra job folder (one holding .hydra/overrides.yaml) under the given folders is read: the evaluate CSVs in
it (run the sweep with out='${hydra:runtime.output_dir}/evaluate.csv' so that each job writes its CSV there),
with the job's overrides as extra columns. Writes to --out:
    results.csv          every row of every job, with `family`, `rel_latency` (s_per_image / the same job's
                         baseline: both were timed side by side), `threshold` (from the override or the plan file)
    results.md           one markdown table per model (baseline rows of all jobs averaged into one)
    matched.md           per model and family: relative L1 interpolated at 0.4, 0.6 and 0.8 of full latency
    pareto_<model>.png   quality (--y) against cost (--x), one line per family
    heatmaps/<plan>.png  with --heatmaps, the heatmap of every plan file the rows name; --plan draws given plans
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from difa.errors import DifaError
from difa.metrics import save_atomic

DEFAULT_ROOT = "multirun/evaluate"
BASELINE = "baseline"
PRESET_PREFIX = "preset_"  # difa.evaluate names a preset's row "preset_<name>"
METRICS = ["attn_flops", "macs", "rel_latency", "s_per_image", "fid", "inception_score", "class_acc", "rel_l1",
           "psnr_db", "ssim", "gmacs_per_image", "peak_mem_mb", "calib_s"]  # calib_s: a peer's own calibration run
# Interval columns written by difa.evaluate next to a metric: 95% bootstrap bounds (_lo, _hi) and the latency's
# spread over the timed batches (_min, _max). Metrics, not labels; shown folded into the metric's cell.
BOUNDS = {"rel_l1": ("_lo", "_hi"), "psnr_db": ("_lo", "_hi"), "ssim": ("_lo", "_hi"), "class_acc": ("_lo", "_hi"),
          "rel_latency": ("_min", "_max")}
INTERVALS = [m + b for m, (lo, hi) in BOUNDS.items() for b in (lo, hi)] + ["timed_batches"]
QUALITY_ORDER = ("rel_l1", "psnr_db", "class_acc", "fid")  # --y auto: the first with values (fidelity first: FID
# at n = 100 is small-sample bias, see experiments/README.md)
# Overrides that say where things go or which machine runs them, not what was measured.
NOT_LABELS = {"model", "plan", "out", "save_plan", "cache_dir", "classifier", "device", "n", "batch", "fid", "warmup",
              "ref_n", "fid_source", "tag", "baseline_cache", "time_batches", "timed_images", "threads",
              "calib_forwards"}
# Baseline rows agree on these when they come from the same generation settings.
BASELINE_KEYS = ["model", "steps", "n", "seed", "guidance_scale"]


def job_dirs(root: str | Path) -> list[Path]:
    """Hydra job folders (holding .hydra/overrides.yaml) at or under `root`, in sweep order."""
    root = Path(root)
    if not root.is_dir():
        raise DifaError(f"{str(root)!r} is not a folder; pass a Hydra multirun folder such as {DEFAULT_ROOT}/<date>")
    found = {p.parent.parent for p in root.rglob("overrides.yaml") if p.parent.name == ".hydra"}
    # (numbers in the path, path): job 10 after job 9; a single run next to multirun folders sorts too
    return sorted(found, key=lambda p: (tuple(int(s) if s.isdigit() else -1 for s in p.relative_to(root).parts), str(p)))


def read_overrides(job: Path) -> dict[str, Any]:
    """{key: value} of the job's command-line overrides (`+key=v` gives `key`); Hydra's own ones left out."""
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    out = {}
    for o in OverridesParser.create().parse_overrides(lines):
        if o.is_hydra_override() or o.value() is None:
            continue
        v = o.value()
        out[o.key_or_group] = v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
    return out


@lru_cache(maxsize=None)
def plan_facts(path: str) -> dict[str, Any]:
    """What a plan file says about how it was made: preset, threshold, candidates. {} where it cannot be read."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    c = d.get("calibration", {}) if isinstance(d, dict) else {}
    return {k: c[k] for k in ("preset", "threshold", "candidates", "search", "budget") if k in c}


def family_of(row: pd.Series) -> str:
    """The line a row belongs to in the Pareto plot: `tag` override, else the preset, else how the plan was
    calibrated (see candidates_family), else the method name."""
    if row["method"] == BASELINE:
        return BASELINE
    tag = row.get("tag")
    if isinstance(tag, str) and tag:
        return tag
    if str(row["method"]).startswith(PRESET_PREFIX):
        return str(row["method"])[len(PRESET_PREFIX):]
    facts = plan_facts(str(row.get("plan", "")))
    if "preset" in facts:
        return str(facts["preset"])
    if facts.get("search") == "trajectory":  # the default search: block cells from one recorded trajectory
        return "difa"
    if "candidates" in facts:
        return candidates_family(facts["candidates"])
    return str(row["method"])


def candidates_family(candidates: Sequence[str]) -> str:
    """Greedy plans: difa-greedy with every attention candidate, ditfastattn with DiTFastAttn's four, else
    difa[a+b] for a restricted set."""
    from difa.calibration import DEFAULT_CANDIDATES
    from difa.presets import DITFASTATTN_CANDIDATES
    from difa.techniques import attention_methods

    cands = set(candidates)
    attention = set(attention_methods(DEFAULT_CANDIDATES))
    if cands == set(DITFASTATTN_CANDIDATES):
        return "ditfastattn"
    if cands >= attention - {"tgate"}:  # T-GATE is dropped where there is no cross-attention
        return "difa-greedy"
    return f"difa[{'+'.join(c for c in DEFAULT_CANDIDATES if c in cands)}]"


def read_job(job: Path) -> pd.DataFrame | None:
    """The job's evaluate CSV rows with its overrides as columns (the CSV's own columns win), or None."""
    csvs = sorted(job.glob("*.csv"))
    if not csvs:
        return None
    overrides = read_overrides(job)
    frames = []
    for csv in csvs:
        df = pd.read_csv(csv)
        if "method" not in df.columns or "s_per_image" not in df.columns:
            continue  # not an evaluate table
        if "rel_latency" not in df.columns or df.rel_latency.isna().all():  # CSVs of before difa wrote it
            base = df.loc[df.method == BASELINE, "s_per_image"]
            df["rel_latency"] = df.s_per_image / base.iloc[0] if len(base) else math.nan
        for k, v in overrides.items():
            if k not in df.columns and k not in METRICS and k not in INTERVALS:  # fid=false is a switch, not a metric
                df[k] = v
        df["job"] = str(job)
        df["csv"] = csv.name
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else None


def collect(roots: Iterable[str | Path]) -> pd.DataFrame:
    """All rows of all evaluate jobs under `roots`, with `family`, `rel_latency` and `threshold` columns."""
    frames, empty = [], []
    for root in roots:
        for job in job_dirs(root):
            df = read_job(job)
            if df is None:
                empty.append(job)
            else:
                frames.append(df)
    if not frames:
        where = ", ".join(map(str, roots))
        raise DifaError(f"no evaluate CSV in any Hydra job folder under {where}; run the sweep with "
                        "out='${hydra:runtime.output_dir}/evaluate.csv'")
    if empty:
        print(f"collect: {len(empty)} job folder(s) without an evaluate CSV skipped, e.g. {empty[0]}", file=sys.stderr)
    df = pd.concat(frames, ignore_index=True)
    df["family"] = df.apply(family_of, axis=1)
    from_plan = df.get("plan", pd.Series([""] * len(df))).map(lambda p: plan_facts(str(p)).get("threshold", math.nan))
    df["threshold"] = df["threshold"].fillna(from_plan) if "threshold" in df.columns else from_plan
    df.loc[df.method == BASELINE, "threshold"] = math.nan
    return df


def merge_baselines(df: pd.DataFrame) -> pd.DataFrame:
    """One baseline row per generation setting (numeric columns averaged over the jobs), then the other rows."""
    base, rest = df[df.method == BASELINE], df[df.method != BASELINE]
    if base.empty:
        return rest
    keys = [k for k in BASELINE_KEYS if k in df.columns]
    numeric = [c for c in METRICS + INTERVALS if c in base.columns and pd.api.types.is_numeric_dtype(base[c])]
    merged = base.groupby(keys, dropna=False)[numeric].mean().reset_index() if keys else base[numeric].mean().to_frame().T
    merged["method"], merged["family"] = BASELINE, BASELINE
    merged["jobs"] = base.groupby(keys, dropna=False).size().values if keys else len(base)
    return pd.concat([merged, rest], ignore_index=True)


def label_columns(df: pd.DataFrame) -> list[str]:
    """Columns that tell the rows of a sweep apart: overrides (and the threshold) that take more than one value."""
    rows = df[df.method != BASELINE]
    known = set(METRICS) | set(INTERVALS) | {"method", "family", "job", "csv", "jobs", "plan", "model", "mem_measure", "dtype", "device"}
    cols = [c for c in df.columns if c not in known and c not in NOT_LABELS]
    return [c for c in cols if rows[c].nunique(dropna=False) > 1 or (c == "threshold" and rows[c].notna().any())]


def quality_column(df: pd.DataFrame, y: str) -> str:
    if y != "auto":
        return y
    for c in QUALITY_ORDER:
        if c in df.columns and df[c].notna().any():
            return c
    raise DifaError(f"none of {', '.join(QUALITY_ORDER)} has values; pass --y <column>")


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def markdown_table(df: pd.DataFrame, columns: Sequence[str]) -> str:
    """A GitHub markdown table of `columns` (numbers to 4 significant digits, NaN empty)."""
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in columns) + "|"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df[list(columns)].itertuples(index=False)]
    return "\n".join([head, rule, *body])


def fold_intervals(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """`columns` of df with each metric's interval folded into its cell as text: `v ± h` (h: half the 95% bootstrap
    interval's width; the interval itself is in results.csv) and, for latency, `v (min–max)`."""
    out = df[list(columns)].copy()
    for col in columns:
        lo, hi = (f"{col}{b}" for b in BOUNDS.get(col, ("", "")))
        if col not in BOUNDS or lo not in df.columns or hi not in df.columns or df[lo].isna().all():
            continue
        cells = []
        for v, a, b in zip(df[col], df[lo], df[hi]):
            if not (isinstance(a, float) and math.isfinite(a) and math.isfinite(b)):
                cells.append(_cell(v))
            elif col == "rel_latency":
                cells.append(f"{_cell(v)} ({a:.3g}–{b:.3g})")
            else:
                cells.append(f"{_cell(v)} ± {(b - a) / 2:.2g}")
        out[col] = pd.Series(cells, index=df.index, dtype=object)
    return out


def model_tables(df: pd.DataFrame) -> str:
    parts = []
    for model, part in df.groupby("model", sort=True):
        part = merge_baselines(part)
        labels = label_columns(part)
        metrics = [c for c in METRICS if c in part.columns and part[c].notna().any()]
        part = part.assign(_later=part.method != BASELINE).sort_values(["_later", "family", *labels])
        jobs = int(part.loc[part.method == BASELINE, "jobs"].sum()) if "jobs" in part.columns else 0
        note = (f"\n\nbaseline rows: the mean of the baseline runs of the jobs with the same steps, n, seed and "
                f"guidance scale ({jobs} jobs)" if jobs > 1 else "")
        if any(f"{c}_lo" in part.columns for c in BOUNDS):
            note += ("\n\n± : half the width of the 95% bootstrap interval over images (bounds in results.csv); "
                     "rel_latency: median over the timed batches (min–max)")
        cols = ["family", "method", *labels, *metrics]
        parts.append(f"### {model}\n\n" + markdown_table(fold_intervals(part, cols), cols) + note)
    return "\n\n".join(parts) + "\n"


MATCHED_AT = (0.4, 0.6, 0.8)
MIN_FID_N = 2000  # below this, no FID axis (issue 17)


def at_latency(x: Sequence[float], y: Sequence[float], at: float, *bounds: Sequence[float]):
    """y linearly interpolated at x = `at` along one family's curve (points sorted by x; at equal x the lower y,
    since a Pareto curve keeps the better point); NaN outside the curve's x range (not reached). With `bounds`
    (e.g. the interval's lo and hi per point), returns (y, *bounds) interpolated between the same two points."""
    pts: dict[float, tuple[float, ...]] = {}
    for a, b, *rest in zip(x, y, *bounds):
        if math.isfinite(a) and math.isfinite(b) and (a not in pts or b < pts[a][0]):
            pts[a] = (b, *rest)
    xs = sorted(pts)
    value = (math.nan,) * (1 + len(bounds))
    for lo, hi in zip(xs, xs[1:]):
        if lo <= at <= hi:
            t = (at - lo) / (hi - lo)
            value = tuple(p + (q - p) * t for p, q in zip(pts[lo], pts[hi]))
            break
    else:
        if len(xs) == 1 and xs[0] == at:
            value = pts[at]
    return value if bounds else value[0]


def matched_table(df: pd.DataFrame, y: str = "rel_l1", at: Sequence[float] = MATCHED_AT) -> str:
    """Per model, each family's `y` interpolated at the latencies `at` (fractions of the uncompressed model's):
    the planner issue's comparison at matched latency. '–': the family's curve does not reach that latency. Where
    the rows carry bootstrap bounds, they are interpolated between the same two points, shown as [lo, hi], and a
    line per latency says which family is lowest and whose intervals overlap its interval."""
    parts = []
    by = ["model", "steps"] if "steps" in df.columns and df.steps.nunique() > 1 else ["model"]  # never across steps
    lo_col, hi_col = f"{y}_lo", f"{y}_hi"
    for key, part in df.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        model = " ".join(f"{k}={v}" if k == "steps" else str(v) for k, v in zip(by, key))
        part = part[part.method != BASELINE]
        with_bounds = lo_col in part.columns and part[lo_col].notna().any()
        rows, found = [], {a: {} for a in at}
        for family, fam in part.groupby("family", sort=True):
            bounds = (fam[lo_col].tolist(), fam[hi_col].tolist()) if with_bounds else ()
            cells = {}
            for a in at:
                v, *b = at_latency(fam.rel_latency.tolist(), fam[y].tolist(), a, *bounds) if bounds else \
                    (at_latency(fam.rel_latency.tolist(), fam[y].tolist(), a),)
                if math.isnan(v):
                    cells[f"{y} @ {a}"] = "–"
                    continue
                found[a][family] = (v, *b)
                cells[f"{y} @ {a}"] = f"{v:.3f} [{b[0]:.3f}, {b[1]:.3f}]" if b and math.isfinite(b[0]) else f"{v:.3f}"
            rows.append({"family": family, "points": len(fam), **cells})
        table = pd.DataFrame(rows)
        text = f"### {model}\n\n" + markdown_table(table, list(table.columns))
        if with_bounds:
            text += "\n\n" + "\n".join(overlap_lines(found, y))
        parts.append(text)
    return "\n\n".join(parts) + "\n"


def overlap_lines(found: dict[float, dict[str, tuple]], y: str) -> list[str]:
    """Per latency: the family with the lowest `y` and the families whose 95% interval overlaps its interval."""
    lines = []
    for a, fams in found.items():
        fams = {f: v for f, v in fams.items() if len(v) == 3 and math.isfinite(v[1])}
        if not fams:
            continue
        best = min(fams, key=lambda f: fams[f][0])
        _, lo, hi = fams[best]
        overlap = [f for f, (_, l2, h2) in fams.items() if f != best and l2 <= hi and lo <= h2]
        others = len(fams) - 1
        lines.append(f"- at {a}: lowest {y} {best} {fams[best][0]:.3f} [{lo:.3f}, {hi:.3f}]; "
                     + (f"intervals overlap with {', '.join(sorted(overlap))}" if overlap
                        else "no other family reaches this latency" if not others
                        else f"no other family's interval overlaps ({others} other{'s' * (others > 1)})"))
    return lines


def write_text(path: Path, text: str) -> Path:
    return save_atomic(path, lambda f: f.write(text.encode()))


def draw_pareto(df: pd.DataFrame, out: Path, x: str, y: str) -> list[Path]:
    from difa.plots import pareto_plot

    paths = []
    for model, part in df.groupby("model", sort=True):
        part = merge_baselines(part)
        labels = label_columns(part)
        label = "threshold" if "threshold" in labels else (labels[0] if labels else None)
        try:
            ycol = quality_column(part, y)
            title = f"{model}: quality vs cost"
            if ycol == "fid":  # at small n FID ranks by its small-sample bias (experiments/README.md)
                n = int(part["n"].min()) if "n" in part.columns and part["n"].notna().any() else 0
                if n < MIN_FID_N:
                    raise DifaError(f"FID on the y axis needs n >= {MIN_FID_N} images per method (these rows have "
                                    f"n={n}); plot a fidelity column (--y rel_l1) or re-run with n={MIN_FID_N}")
                refs = part["ref_n"].dropna().unique() if "ref_n" in part.columns else []
                title += f" (FID: {n} samples against {', '.join(str(int(r)) for r in refs) or '?'} references)"
            paths.append(pareto_plot(part, out / f"pareto_{model}.png", x=x, y=ycol, label=label, title=title))
        except DifaError as e:
            print(f"collect: no Pareto plot for {model}: {e}", file=sys.stderr)
    return paths


def draw_heatmaps(plans: Iterable[str], out: Path) -> list[Path]:
    from difa.plots import plan_heatmap

    return [plan_heatmap(p, out / f"{Path(p).stem}.png") for p in dict.fromkeys(plans)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("roots", nargs="*", help=f"multirun folders (default {DEFAULT_ROOT} unless only --plan is given)")
    ap.add_argument("--out", default="experiments/results", help="output folder")
    ap.add_argument("--x", default="rel_latency", help="cost column: rel_latency, s_per_image or attn_flops")
    ap.add_argument("--y", default="auto", help=f"quality column; auto = the first of {', '.join(QUALITY_ORDER)} with values")
    ap.add_argument("--heatmaps", action="store_true", help="also draw the heatmap of every plan file in the rows")
    ap.add_argument("--plan", action="append", default=[], help="draw this plan's heatmap (repeatable)")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> list[Path]:
    out = Path(args.out)
    written = draw_heatmaps(args.plan, out / "heatmaps")
    roots = args.roots or ([] if args.plan else [DEFAULT_ROOT])
    if not roots:
        return written
    df = collect(roots)
    written.append(write_text(out / "results.csv", df.to_csv(index=False)))
    written.append(write_text(out / "results.md", model_tables(df)))
    if "rel_l1" in df.columns and "rel_latency" in df.columns:
        written.append(write_text(out / "matched.md", matched_table(df)))
    written += draw_pareto(df, out, args.x, args.y)
    if args.heatmaps:
        files = [p for p in df.get("plan", pd.Series(dtype=str)).dropna().astype(str).unique() if Path(p).is_file()]
        written += draw_heatmaps(files, out / "heatmaps")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    try:
        for path in run(parse_args(argv)):
            print(f"written {path}")
    except DifaError as e:
        print(f"collect: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
