"""Speed at real model widths: every method's plan on DiT-XL/2, PixArt-alpha/Sigma XL/2 and SD-XL's UNet, with
random weights, at 1024, 4096 and 16384 image tokens (issue 16).

    python benchmarks/bench_scale.py                       # CPU defaults (about 17 minutes): see below
    python benchmarks/bench_scale.py --archs dit --tokens 1024 4096 --depth 4 --reps 3
    python benchmarks/bench_scale.py --device cuda --dtype float16 --depth 28   # on a GPU (benchmarks/gpu_check.sh)

CPU defaults (2 cores): depth reduced to 1 block (SD-XL: 1 transformer layer per level), said in the output; DiT
at 1024, 4096 and 16384 tokens, PixArt and SD-XL at 1024 (pass --tokens to run others); 3 repeats at 1024, 2 at
4096; at 16384 batch 1, 1 repeat and the plans all-full, wars, ast, reuse, forecast. On CUDA: real depth, every
architecture at every size, 3 repeats.

Per architecture and token count, one row per plan, all timed side by side in one run, interleaved (each repeat
times the unpatched model, every plan once in turn, then the unpatched model again; a plan's time is divided by
the mean of its repeat's two unpatched runs):
- `attn share`: the attention modules' share of an unpatched forward (forward hooks around each module);
- `time`: median (min-max) over the repeats of the plan's S-forward sequence / the unpatched sequence (the
  mean of the two that bracket the repeat);
- `FLOPs`: the plan's FLOPs / the unpatched FLOPs (torch's FlopCounterMode for the linear / conv work, difa's
  per-method attention FLOPs for the attention cores, which the counter does not see in fused kernels);
- `predicted`: difa's latency cost model (the microbenchmark calibration uses) for the plan, a step T-GATE runs on
  one CFG half (every cross-attention gated) charged at half its time;
- `measured/ideal`: time / FLOPs (1.0: the plan saves exactly its FLOPs' share of time).
Plans: S denoiser forwards on one fixed input (step 0 computed; the method from step 1 on, every layer or block
it can take): wars (window N/8 per side + residual), ast, asc (CFG batch only), wars+asc, tome (ratio 0.5),
agent, tgate (cross-attention), d6-mix (DiTFastAttn-D6-like: wars / wars+asc / ast by layer; left out where the
model has one self-attention layer, where it is `wars`), reuse and forecast (every block skipped at every second
step, forecast from the two last computed steps).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difa.calibration import fixed_plan, latency  # noqa: E402
from difa.cost import collapsed_steps, method_flops  # noqa: E402
from difa.calibration.latency import Capture, measure  # noqa: E402
from difa.calls import shape as _shape  # noqa: E402
from difa.apply import apply_plan, plan_blocks, plan_layers, remove_plan  # noqa: E402

CPU_LARGE = 16384  # from this many tokens the CPU run is cut down (see main)
CPU_LARGE_PLANS = ("all-full", "wars", "ast", "reuse", "forecast")
CPU_TOKENS = {"dit": (1024, 4096, 16384), "pixart": (1024,), "sdxl": (1024,)}  # the default sizes on CPU
ALL_TOKENS = (1024, 4096, 16384)
REAL_DEPTH = {"dit": 28, "pixart": 28, "sdxl": 10}  # SD-XL: transformer layers per block at its deepest level
TEXT = {"pixart": (120, 4096), "sdxl": (77, 2048)}  # text tokens, width (T5-XXL; CLIP-L + bigG)


def build(arch: str, tokens: int, depth: int, dtype: torch.dtype, device: str, b: int = 2):
    """(model, holder for fixed_plan, forward kwargs) at `tokens` image tokens, random weights, seeded."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel

    side = math.isqrt(tokens)
    assert side * side == tokens, "tokens must be a square"
    torch.manual_seed(0)
    # b = 2: a CFG batch, identical latents in both halves as the pipelines build it
    if arch in ("dit", "pixart"):
        common = dict(num_layers=depth, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                      patch_size=2, sample_size=2 * side)  # patch 2: (2 side / 2)^2 = tokens
        if arch == "dit":
            model = DiTTransformer2DModel(**common, num_embeds_ada_norm=1000)
            cond = dict(class_labels=torch.tensor([207, 1000][:b], device=device))
        else:
            n, c = TEXT["pixart"]
            model = PixArtTransformer2DModel(**common, cross_attention_dim=1152, caption_channels=c,
                                             use_additional_conditions=False)
            cond = dict(encoder_hidden_states=torch.randn(b, n, c, device=device, dtype=dtype),
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        latent = torch.randn(1, 4, 2 * side, 2 * side, device=device, dtype=dtype).repeat(b, 1, 1, 1)
        inputs = dict(hidden_states=latent, timestep=torch.tensor([500] * b, device=device), **cond)
        holder = types.SimpleNamespace(transformer=model)
    else:  # SD-XL base: the real UNet config, transformer depth per level reduced; image tokens = latent pixels
        n, c = TEXT["sdxl"]
        model = UNet2DConditionModel(
            sample_size=side, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, min(2, depth), depth),
            cross_attention_dim=c, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, use_linear_projection=True)
        latent = torch.randn(1, 4, side, side, device=device, dtype=dtype).repeat(b, 1, 1, 1)
        inputs = dict(sample=latent, timestep=torch.tensor(500, device=device),
                      encoder_hidden_states=torch.randn(b, n, c, device=device, dtype=dtype),
                      added_cond_kwargs={"text_embeds": torch.randn(b, 1280, device=device, dtype=dtype),
                                         "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * b,
                                                                  device=device, dtype=dtype)})
        holder = types.SimpleNamespace(unet=model)
    model = (model.to(device) if dtype == torch.float32 else model.to(device=device, dtype=dtype)).eval()
    holder.scheduler = DDIMScheduler()  # S calls per generation (fixed_plan counts them)
    return model, holder, inputs


def plans(holder, steps: int, only: tuple[str, ...] | None = None) -> dict:
    """Name -> Plan; each method on every cell it can take from step 1 on (tome / agent from step 0)."""
    _, _, layers = plan_layers(holder)
    kinds = [n.rsplit(".", 1)[-1] for n, _ in layers]
    has_cross = "attn2" in kinds
    g = 4.0

    def every(method, kind=None, start=1, **kw):
        return fixed_plan(holder, lambda i, t: method if t >= start and (kind is None or kinds[i] == kind) else "full",
                          steps=steps, guidance_scale=g, **kw)

    self_idx = [i for i, k in enumerate(kinds) if k == "attn1"]
    mix = {i: ("wars", "wars+asc", "ast")[r % 3] for r, i in enumerate(self_idx)}
    out = {
        "all-full": every("full"),
        "wars": every("wars", "attn1"),
        "ast": every("ast"),
        "asc": every("asc", "attn1"),
        "wars+asc": every("wars+asc", "attn1"),
        "tome": every("tome", "attn1", start=0, techniques={"tome": {"max_downsample": 8}}),
        "agent": every("agent", "attn1", start=0, techniques={"agent": {"max_downsample": 8}}),
        "d6-mix": fixed_plan(holder, lambda i, t: mix.get(i, "full") if t >= 1 else "full", steps=steps,
                             guidance_scale=g),
        "reuse": fixed_plan(holder, lambda i, t: "full", steps=steps, guidance_scale=g,
                            block=lambda j, t: "reuse" if t % 2 else "full"),
        "forecast": fixed_plan(holder, lambda i, t: "full", steps=steps, guidance_scale=g,
                               block=lambda j, t: "forecast" if t >= 2 and t % 2 == 0 else "full"),
    }
    if has_cross:
        out["tgate"] = every("tgate", "attn2")
    if len(set(mix.values())) == 1:  # one self-attention layer: the mix is `wars`
        del out["d6-mix"]
    return {k: v for k, v in out.items() if only is None or k in only}


def run_sequence(model, inputs: dict, steps: int) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            model(**inputs, return_dict=False)
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def attention_share(model, holder, inputs: dict) -> float:
    _, _, layers = plan_layers(holder)
    spent, started = [0.0], {}

    def pre(name):
        return lambda m, a, k: started.__setitem__(name, time.perf_counter())

    def post(name):
        return lambda m, a, k, o: spent.__setitem__(0, spent[0] + time.perf_counter() - started[name])

    handles = []
    for n, m in layers:
        handles.append(m.register_forward_pre_hook(pre(n), with_kwargs=True))
        handles.append(m.register_forward_hook(post(n), with_kwargs=True))
    total = run_sequence(model, inputs, 1)
    for h in handles:
        h.remove()
    return spent[0] / total


def flops_ratios(model, holder, inputs: dict, plan_set: dict, steps: int) -> tuple[dict, list]:
    """Plan FLOPs / unpatched FLOPs, per plan. Unpatched: FlopCounterMode (linear, conv, ...) plus the attention
    cores (4 B inner Nq Nkv per layer), which fused CPU kernels hide from the counter. Plans: each cell's method
    FLOPs in place of full attention; a skipped block saves its counted FLOPs and its attention cores."""
    from torch.utils.flop_counter import FlopCounterMode

    _, _, layers = plan_layers(holder)
    blocks = [n for n, _ in plan_blocks(holder)]
    shapes: dict[int, object] = {}
    handles = []
    for i, (n, m) in enumerate(layers):
        def grab(mod, a, k, i=i):
            x = a[0] if a else k["hidden_states"]
            ctx = k.get("encoder_hidden_states")
            shapes[i] = _shape(mod, x, ctx, None)
        handles.append(m.register_forward_pre_hook(grab, with_kwargs=True))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(**inputs, return_dict=False)
    for h in handles:
        h.remove()
    counts = fc.get_flop_counts()

    def counted(prefix: str) -> float:  # FLOPs the counter attributes to module `prefix` (its qualified name)
        return float(sum(sum(v.values()) for k, v in counts.items() if k.split(".", 1)[-1] == prefix))

    total = float(fc.get_total_flops())
    core = {i: 4.0 * s.batch * s.inner * s.n_q * s.n_kv for i, s in shapes.items()}
    full_attn = {i: method_flops("full", s, {}) for i, s in shapes.items()}  # projections + core
    proj_counted = {i: full_attn[i] - core[i] for i in shapes}
    step_full = total + sum(core.values())
    block_full = {j: counted(n) + sum(core[i] for i, (ln, _) in enumerate(layers) if ln.startswith(n + "."))
                  for j, n in enumerate(blocks)}
    out = {}
    for name, plan in plan_set.items():
        spent = 0.0
        ran = _executed(plan, steps)
        one_half = collapsed_steps(plan.methods, plan.model.layers, plan.cfg_enabled)  # every cross-attention gated
        for t in range(steps):
            s = step_full
            for j, row in enumerate(plan.blocks):
                if row[t] != "full":
                    s -= block_full[j]
            for i, row in enumerate(plan.methods):
                if ran[i][t] and row[t] != "full" and i in shapes:
                    s += method_flops(row[t], shapes[i], plan.techniques) - proj_counted[i] - core[i]
            spent += s / 2 if one_half[t] else s  # the engine runs that step on one CFG half
        out[name] = spent / (steps * step_full)
    return out, [shapes.get(i) for i in range(len(layers))]


def _executed(plan, steps):
    from difa.plan import executed_cells

    return executed_cells(plan.model.layers, plan.model.blocks, plan.blocks, steps)


def predicted(model, holder, inputs: dict, plan_set: dict, steps: int) -> dict:
    """difa's latency cost model (calibration's microbenchmark on this input) for each plan."""
    from difa.adapters import adapter_for

    adapter = adapter_for(holder)
    _, _, layers = plan_layers(holder)
    blocks = plan_blocks(holder)
    capture = Capture(model, adapter, blocks, layers, at=0)
    try:
        with torch.no_grad():
            model(**inputs, return_dict=False)
    finally:
        capture.close()
    methods = sorted({m for p in plan_set.values() for r in p.methods for m in r} - {"full"})
    params = {k: v for p in plan_set.values() for k, v in p.techniques.items()}
    lat = measure(model, adapter, blocks, layers, capture, params, methods, 0.0, cache_dir=None)
    names = [n for n, _ in layers]
    return {k: lat.predict(names, p.methods, p.blocks or [["full"] * steps for _ in blocks], steps,
                           collapsed_steps(p.methods, p.model.layers, p.cfg_enabled))["fraction"]
            for k, p in plan_set.items()}


def bench(arch: str, tokens: int, depth: int, steps: int, reps: int, dtype: torch.dtype, device: str,
          batch: int = 2, only: tuple[str, ...] | None = None) -> list[dict]:
    model, holder, inputs = build(arch, tokens, depth, dtype, device, batch)
    plan_set = plans(holder, steps, only)
    share = attention_share(model, holder, inputs)
    flops, _ = flops_ratios(model, holder, inputs, plan_set, steps)
    pred = predicted(model, holder, inputs, plan_set, steps)
    times: dict[str, list[float]] = {k: [] for k in plan_set}
    run_sequence(model, inputs, 1)  # warm-up
    for _ in range(reps):  # interleaved: every plan once per repeat, between two unpatched runs
        before, spent = run_sequence(model, inputs, steps), {}
        for name, plan in plan_set.items():
            apply_plan(holder, plan)
            try:
                spent[name] = run_sequence(model, inputs, steps)
            finally:
                remove_plan(holder)
        base = (before + run_sequence(model, inputs, steps)) / 2
        for name, t in spent.items():
            times[name].append(t / base)
    rows = []
    for name in plan_set:
        t = times[name]
        med = statistics.median(t)
        rows.append(dict(arch=arch, tokens=tokens, depth=depth, plan=name, attn_share=share, time=med,
                         time_min=min(t), time_max=max(t), flops=flops[name], predicted=pred[name],
                         measured_over_ideal=med / flops[name]))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", default=["dit", "pixart", "sdxl"], choices=["dit", "pixart", "sdxl"])
    ap.add_argument("--tokens", nargs="+", type=int, default=None,
                    help="image tokens (squares); default 1024 4096 16384 (on CPU: see the module docstring)")
    ap.add_argument("--depth", type=int, default=None, help="blocks (SD-XL: transformer layers at the deepest level); "
                    "default: 28/10 on CUDA, 1 on CPU")
    ap.add_argument("--steps", type=int, default=3, help="denoiser forwards per timed sequence (>= 3)")
    ap.add_argument("--reps", type=int, default=None,
                    help="interleaved repeats (default 3; on CPU 2 at 4096 and 1 at 16384 tokens)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")
    print(f"# bench_scale: torch {torch.__version__}, {args.device}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"{args.steps} forwards per sequence, CFG batch 2")
    for arch in args.archs:
        depth = args.depth or (REAL_DEPTH[arch] if cuda else 1)
        if depth != REAL_DEPTH[arch]:
            print(f"# {arch}: depth reduced {REAL_DEPTH[arch]} -> {depth} "
                  f"({'blocks' if arch != 'sdxl' else 'transformer layers at the deepest level'}) for CPU time")
        sizes = args.tokens or (ALL_TOKENS if cuda else CPU_TOKENS[arch])
        if not args.tokens and not cuda:
            print(f"# {arch} on CPU at {', '.join(map(str, sizes))} tokens (--tokens for others; CUDA runs "
                  f"{', '.join(map(str, ALL_TOKENS))})")
        print(f"{'arch':6} {'tokens':>6} {'plan':9} {'attn share':>10} {'time (min-max)':>20} {'FLOPs':>6} "
              f"{'predicted':>9} {'measured/ideal':>14}")
        for tokens in sizes:
            reps, batch, only = args.reps or (3 if cuda or tokens <= 1024 else 2), 2, None
            if not cuda and tokens >= CPU_LARGE:  # about 10 s per forward on 2 cores even at depth 1
                reps, batch, only = 1, 1, CPU_LARGE_PLANS
                latency.REPS = 1  # the cost model's microbenchmark: one timed call per unit
                print(f"# {arch} at {tokens} tokens on CPU: batch 1 (no CFG), 1 repeat, plans {', '.join(only)}")
            t0 = time.perf_counter()
            for r in bench(arch, tokens, depth, args.steps, reps, dtype, args.device, batch, only):
                print(f"{arch:6} {tokens:>6} {r['plan']:9} {r['attn_share']:>10.2f} "
                      f"{r['time']:>7.3f} ({r['time_min']:.3f}-{r['time_max']:.3f}) {r['flops']:>6.3f} "
                      f"{r['predicted']:>9.3f} {r['measured_over_ideal']:>14.2f}", flush=True)
            print(f"# {arch} at {tokens} tokens: {time.perf_counter() - t0:.0f} s, {reps} repeats", flush=True)


if __name__ == "__main__":
    main()
