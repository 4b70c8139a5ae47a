"""The joint-attention (MMDiT) families of issue 14: SD3, FLUX and CogVideoX, on tiny random-weight pipelines with the
real architectures (difa.tiny).

Their attention layers hold text and image / video tokens at once (kind "joint", from the adapter, whatever the
module is named) and return a tuple (or, FLUX's single-stream blocks, the joined sequence); their blocks take two
streams and return a tuple: (text, image) for SD3 and FLUX (SD3's last block: (None, image)), (video, text) for
CogVideoX. For each: the adapter row is found, an all-full plan is bit-exact with the unpatched pipeline and undo is
exact, `ast` and the block methods `reuse` / `forecast` match naive references written here from the module inputs
and outputs recorded with hooks, the methods that do not apply to joint attention are refused with a one-line reason,
and both calibration searches give a plan that saves, loads and runs."""

from __future__ import annotations

import functools

import pytest
import torch

import difa
from difa.adapters import adapter_for
from difa.calibration import calibrate_pipeline, fixed_plan
from difa.cost import cache_elements
from difa.calibration.served import decode_seconds
from difa.apply import plan_blocks, plan_layers
from difa.errors import DifaError
from difa.plan import Plan
from difa.presets import preset_plan
from difa.techniques import REGISTRY, kind_of, wars
from difa.tiny import TEXT_TOKENS, tiny_call_kwargs
from tests.test_families import GUIDANCE, STEPS, generate, latents_then_decoded, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("sd3", "sd35", "flux", "cogvideox")  # sd35: SD3.5 Medium's structure (attn2 blocks), family sd3
SD3 = ("sd3", "sd35")
MODEL_CLASS = {"sd3": "SD3Transformer2DModel", "sd35": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel",
               "cogvideox": "CogVideoXTransformer3DModel"}
INPUTS = ["a red bird", "a blue car"]  # the prompts generate() uses


@pytest.fixture(params=FAMILIES)
def fam(request) -> str:
    return request.param


def family_of(fam: str) -> str:
    """The adapter family of a tiny model name."""
    return "sd3" if fam in SD3 else fam


def record(modules):
    """Forward hooks on `modules`: per module, a list of (args, kwargs, output) of every call."""
    calls = [[] for _ in modules]
    handles = []
    for k, m in enumerate(modules):
        def hook(module, args, kwargs, output, k=k):
            calls[k].append((args, dict(kwargs), output))
        handles.append(m.register_forward_hook(hook, with_kwargs=True))
    return calls, handles


class _Unswap:
    def __init__(self, module, cls):
        self.module, self.cls = module, cls

    def remove(self):
        self.module.__class__ = self.cls


def record_calls(modules):
    """Like `record`, at the call itself: per module, (args, kwargs, output) of every call made to it from outside,
    what the caller gets, a planned block's stand-in output included. (A plan's engine routes a block's calls ahead
    of its forward hooks, which fire only when the block computes: difa/wrap.py.) Each module's class is swapped for
    a recording subclass; the handles swap it back. Apply the plan first."""
    calls = [[] for _ in modules]
    handles = []
    for k, m in enumerate(modules):
        cls = type(m)

        def __call__(self, *args, _k=k, _cls=cls, **kwargs):
            out = _cls.__call__(self, *args, **kwargs)
            calls[_k].append((args, dict(kwargs), out))
            return out

        m.__class__ = type(cls.__name__, (cls,), {"__call__": __call__})
        handles.append(_Unswap(m, cls))
    return calls, handles


def test_adapter_rows_are_found(fam):
    pipe = tiny(fam)
    adapter = adapter_for(pipe)
    assert adapter.family == family_of(fam)
    assert adapter_for(adapter.denoiser(pipe)).family == family_of(fam)
    assert (adapter.cfg_layout == "none") == (fam == "flux")
    model, layers = adapter.denoiser(pipe), plan_layers(pipe)[2]
    assert type(model).__name__ == MODEL_CLASS[fam]
    assert len(layers) == {"sd3": 3, "sd35": 5, "flux": 5, "cogvideox": 2}[fam]  # sd35: + attn2 in 2 blocks
    assert {kind_of(n, adapter) for n, _ in layers} == {"joint"}  # the kind comes from the architecture
    # every block holds joint layers, in execution order (SD3.5's dual-attention blocks: attn, then attn2)
    assert list(dict.fromkeys(n.rsplit(".", 1)[0] for n, _ in layers)) == [n for n, _ in plan_blocks(pipe)]


def test_all_full_plan_is_bit_exact_and_undo_is_exact(fam):
    pipe = tiny(fam)
    ref = generate(pipe, fam)
    difa.apply_plan(pipe, fixed_plan(pipe, lambda i, t: "full", steps=STEPS, guidance_scale=GUIDANCE[fam],
                                     block=lambda j, t: "full"))
    assert torch.equal(generate(pipe, fam), ref)  # the processors are transparent
    # blocks run through the two-stream wrapper (it wraps only rows that are not all full): with `reuse` at the last
    # step only, the denoiser outputs of the steps before (computed, residuals cached) are the unpatched ones
    model = adapter_for(pipe).denoiser(pipe)
    (seen,), handles = record([model])
    difa.remove_plan(pipe)
    generate(pipe, fam)
    difa.apply_plan(pipe, fixed_plan(pipe, lambda i, t: "full", steps=STEPS, guidance_scale=GUIDANCE[fam],
                                     block=lambda j, t: "reuse" if t == STEPS - 1 else "full"))
    generate(pipe, fam)
    handles[0].remove()
    plain, planned = seen[:STEPS], seen[STEPS:]
    for t in range(STEPS - 1):
        assert torch.equal(plain[t][2][0], planned[t][2][0]), f"{fam} step {t}"
    assert not torch.equal(plain[-1][2][0], planned[-1][2][0])
    difa.apply_plan(pipe, fixed_plan(pipe, lambda i, t: "ast" if t % 2 else "full", steps=STEPS,
                                     guidance_scale=GUIDANCE[fam]))
    assert not torch.equal(generate(pipe, fam), ref)  # the plan ran
    assert difa.remove_plan(pipe)
    assert torch.equal(generate(pipe, fam), ref)


def test_ast_reuses_both_parts_of_the_joint_output(fam):
    """ast on every joint layer at steps 2, 3 and 5: the module returns its output of the last computed step (1, 1,
    4), both parts of the tuple (image or video, text) as they were; computed steps return something new."""
    pipe = tiny(fam)
    pattern = ["full", "full", "ast", "ast", "full", "ast"]
    plan = fixed_plan(pipe, lambda i, t: pattern[t], steps=STEPS, guidance_scale=GUIDANCE[fam])
    layers = plan_layers(pipe)[2]
    assert all(row == tuple(pattern) for row in plan.methods)
    calls, handles = record([m for _, m in layers])
    difa.apply_plan(pipe, plan)
    try:
        generate(pipe, fam)
    finally:
        for h in handles:
            h.remove()
        difa.remove_plan(pipe)
    tuples = 0
    for (name, _), seen in zip(layers, calls):
        assert len(seen) == STEPS
        outs = [o for _, _, o in seen]
        last = {2: 1, 3: 1, 5: 4}
        for t in range(STEPS):
            parts = outs[t] if isinstance(outs[t], tuple) else (outs[t],)
            if t in last:
                ref = outs[last[t]] if isinstance(outs[last[t]], tuple) else (outs[last[t]],)
                assert len(parts) == len(ref)
                for p, r in zip(parts, ref):
                    assert torch.equal(p, r), f"{fam} {name} step {t}"
            elif t:
                before = outs[t - 1] if isinstance(outs[t - 1], tuple) else (outs[t - 1],)
                assert not torch.equal(parts[0], before[0])
        tuples += isinstance(outs[0], tuple)
    # FLUX's single-stream layers and SD3.5's attn2 (image tokens only) return a tensor
    assert tuples == {"sd3": 3, "sd35": 3, "flux": 2, "cogvideox": 2}[fam]


def _streams(family: str, args, kwargs, output):
    """(hidden, text) of a block call's inputs and of its output (text None: SD3's last block drops it)."""
    x = args[0] if args else kwargs["hidden_states"]
    e = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
    out_hidden, out_text = (output[1], output[0]) if family in (*SD3, "flux") else (output[0], output[1])
    return (x, e), (out_hidden, out_text)


def _recorded(fam: str, pattern: list[str]):
    """(pipe, its blocks, every block call's (args, kwargs, output)) of one generation under a plan whose every
    block follows `pattern` over the steps (attention all full); the plan removed afterwards."""
    pipe = tiny(fam)
    plan = fixed_plan(pipe, lambda i, t: "full", steps=STEPS, guidance_scale=GUIDANCE[fam],
                      block=lambda j, t: pattern[t])
    blocks = plan_blocks(pipe)
    difa.apply_plan(pipe, plan)
    calls, handles = record_calls([m for _, m in blocks])
    try:
        generate(pipe, fam)
    finally:
        for h in handles:
            h.remove()
        difa.remove_plan(pipe)
    return pipe, blocks, calls


def test_block_reuse_and_forecast_match_naive_reference(fam):
    """Every block: full, full, reuse, forecast, full, forecast. Per stream (image or video, and text), the residual
    r(s) = output - input at computed steps s; reuse adds the last one to the input, forecast extrapolates the last
    two linearly to the step. The output keeps the block's own tuple order, SD3's last block its None."""
    pattern = ["full", "full", "reuse", "forecast", "full", "forecast"]
    _, blocks, calls = _recorded(fam, pattern)
    dropped = 0
    for (name, block), seen in zip(blocks, calls):
        assert len(seen) == STEPS
        ins, outs = zip(*(_streams(fam, *c) for c in seen))
        for k in (0, 1):  # hidden, text
            if outs[0][k] is None:  # SD3's last block: no text out, and none made up
                dropped += 1
                assert all(o[k] is None for o in outs) and type(seen[2][2]) is tuple
                continue
            r = {s: outs[s][k] - ins[s][k] for s in (0, 1, 4)}
            expected = {2: ins[2][k] + r[1],
                        3: ins[3][k] + r[1] + (r[1] - r[0]) * 2.0,
                        5: ins[5][k] + r[4] + (r[4] - r[1]) * (1 / 3)}
            for s, e in expected.items():
                torch.testing.assert_close(outs[s][k], e, atol=1e-6, rtol=1e-5,
                                           msg=f"{fam} {name} stream {k} step {s} ({pattern[s]})")
            assert not torch.equal(outs[3][k], ins[3][k] + r[1])  # forecast is not reuse
    assert dropped == (1 if fam in SD3 else 0)


def _rows(obj, b: int, rows: slice):
    """Every tensor of batch b in nested args / kwargs cut to `rows` (a naive version, for the reference)."""
    if torch.is_tensor(obj):
        return obj[rows] if obj.ndim and obj.shape[0] == b else obj
    if isinstance(obj, dict):
        return {k: _rows(v, b, rows) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rows(v, b, rows) for v in obj)
    return obj


@pytest.mark.parametrize("fam", ["sd3", "sd35", "cogvideox"])  # (FLUX is guidance-distilled: no CFG batch)
def test_cfg_cells_match_naive_reference_on_joint_blocks(fam):
    """Every block: full, full, cfg_delta, cfg_forecast, full, cfg_forecast. At a CFG cell, per stream, the
    conditional rows are the block run on the conditional rows of its inputs, and the other rows are their input
    plus the conditional residual plus the difference d = r_u - r_c of the last full step (cfg_delta) or its
    linear extrapolation from the last two (cfg_forecast)."""
    pattern = ["full", "full", "cfg_delta", "cfg_forecast", "full", "cfg_forecast"]
    pipe, blocks, calls = _recorded(fam, pattern)
    half = 2  # two prompts: the CFG batch is 4 rows
    cond = slice(0, half) if adapter_for(pipe).cfg_layout == "cond_first" else slice(half, None)
    other = slice(half, None) if cond.start == 0 else slice(0, half)
    for (name, block), seen in zip(blocks, calls):
        ins, outs = zip(*(_streams(fam, *c) for c in seen))
        for k in (0, 1):  # hidden, text
            if outs[0][k] is None:  # SD3's last block drops the text, under a CFG cell too
                assert all(o[k] is None for o in outs)
                continue
            d = {s: (outs[s][k] - ins[s][k])[other] - (outs[s][k] - ins[s][k])[cond] for s in (0, 1, 4)}
            guess = {2: d[1], 3: d[1] + (d[1] - d[0]) * 2.0, 5: d[4] + (d[4] - d[1]) * (1 / 3)}
            for s, g in guess.items():
                args, kwargs, _ = seen[s]
                with torch.no_grad():
                    computed = _streams(fam, args, kwargs, block(*_rows(args, 2 * half, cond),
                                                                 **_rows(kwargs, 2 * half, cond)))[1][k]
                msg = f"{fam} {name} stream {k} step {s} ({pattern[s]})"
                torch.testing.assert_close(outs[s][k][cond], computed, atol=1e-5, rtol=1e-5, msg=msg)
                torch.testing.assert_close(outs[s][k][other], ins[s][k][other] + (computed - ins[s][k][cond]) + g,
                                           atol=1e-5, rtol=1e-5, msg=msg)


def test_mlp_reuse_matches_naive_hooks_on_joint_blocks(fam):
    """`mlp_reuse` on every block with a feed-forward `ff` (SD3 / FLUX double-stream: the image stream's; CogVideoX:
    the joined [text | video] sequence's), at steps 1, 3, 4: against plain forward hooks on those `ff` modules that
    keep the last computed output and return it at the reuse steps. The text stream's ff_context still runs."""
    pipe = tiny(fam)
    ref = generate(pipe, fam)
    blocks = plan_blocks(pipe)
    has_ff = [isinstance(getattr(b, "ff", None), torch.nn.Module) for _, b in blocks]
    assert any(has_ff) and (all(has_ff) or fam == "flux")  # FLUX's single-stream blocks have proj_mlp instead
    pattern = ["full", "mlp_reuse", "full", "mlp_reuse", "mlp_reuse", "full"]
    plan = fixed_plan(pipe, lambda i, t: "full", steps=STEPS, guidance_scale=GUIDANCE[fam],
                      block=lambda j, t: pattern[t] if has_ff[j] else "full")
    step, cache, handles = [-1], {}, []

    def count(module, args, kwargs):
        step[0] += 1

    def on_ff(j):
        def hook(module, args, out):
            if pattern[step[0]] == "mlp_reuse":
                return cache[j]
            cache[j] = out
            return out
        return hook

    handles.append(adapter_for(pipe).denoiser(pipe).register_forward_pre_hook(count, with_kwargs=True))
    handles += [b.ff.register_forward_hook(on_ff(j)) for j, (_, b) in enumerate(blocks) if has_ff[j]]
    try:
        expected = generate(pipe, fam)
    finally:
        for h in handles:
            h.remove()
    assert step[0] == STEPS - 1 and not torch.equal(expected, ref)  # one denoiser call per step; a real change
    difa.apply_plan(pipe, plan)
    got = generate(pipe, fam)
    difa.remove_plan(pipe)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(generate(pipe, fam), ref)


def test_flux_decode_is_timed_as_the_pipeline_decodes():
    """FLUX returns packed latents (B, N, 4C) with output_type="latent": budget mode times the VAE decode on what the
    pipeline decodes (its own unpacking, scaling and shift), here the same tensor as an np-output call decodes."""
    pipe = tiny("flux")
    real, seen = pipe.vae.decode, []

    @functools.wraps(real)
    def recording(z, *args, **kwargs):
        seen.append(z.clone())
        return real(z, *args, **kwargs)

    pipe.vae.decode = recording
    kw = tiny_call_kwargs("flux")
    final, capture = latents_then_decoded(pipe, "flux", INPUTS, kw)
    assert final.ndim == 3 and len(seen) == 1  # packed tokens; the np call decoded once, the latent one not at all
    pipelines = seen.pop()  # (2, C, H/8, W/8)
    assert decode_seconds(pipe, capture, len(INPUTS), final, kw) > 0 and len(seen) == 4  # warm-up + 3 timed
    for z in seen:
        assert z.shape == pipelines.shape and torch.equal(z[0], pipelines[0]) and torch.equal(z[1], pipelines[0])


def test_methods_that_do_not_apply_are_refused(fam):
    pipe = tiny(fam)
    plan = fixed_plan(pipe, lambda i, t: "full", steps=STEPS, guidance_scale=GUIDANCE[fam])
    name = plan.model.layers[0]
    for method in ("tome", "agent", "tgate") + (() if fam == "flux" else ("asc",)):
        d = plan.to_dict()
        d["methods"][name][2] = method
        with pytest.raises(DifaError, match="joint") as e:
            Plan.from_dict(d, source="test")
        assert "\n" not in str(e.value), method
        assert REGISTRY[method].not_joint in str(e.value)  # the technique's own reason, not a generic one
    if fam != "flux":
        with pytest.raises(DifaError, match="joint"):
            fixed_plan(pipe, lambda i, t: "asc", steps=STEPS, guidance_scale=GUIDANCE[fam])
    for preset in ("tomesd", "agentsd", "tgate"):  # published schedules for attn1 / attn2: refused, not silently full
        with pytest.raises(DifaError, match="joint") as e:
            preset_plan(preset, pipe, steps=STEPS, guidance_scale=GUIDANCE[fam])
        assert "\n" not in str(e.value), preset


@pytest.mark.parametrize("search", ["trajectory", "greedy"])
def test_calibrate_and_run_a_plan(fam, search, tmp_path):
    pipe = tiny(fam)
    plan = calibrate_pipeline(pipe, INPUTS, threshold=0.2, steps=STEPS, guidance_scale=GUIDANCE[fam], seed=0,
                              call_kwargs=tiny_call_kwargs(fam), search=search, latency_cache=None)
    loaded = difa.load_plan(plan.save(tmp_path / "p.json"))
    assert loaded.model.family == family_of(fam)
    cells = [m for row in (loaded.blocks if search == "trajectory" else loaded.methods) for m in row]
    assert set(cells) - {"full"}, "the search planned nothing"  # random weights: cheap methods pass threshold 0.2
    if search == "greedy":  # what cannot run on joint attention is skipped, with the reason recorded
        skipped = loaded.calibration["skipped_candidates"]
        assert "joint" in skipped["tome"] and not {"tome", "asc"} & set(loaded.counts())
    engine = difa.apply_plan(pipe, loaded)
    out = generate(pipe, fam)
    difa.remove_plan(pipe)
    assert torch.isfinite(out).all()
    # the cache the cost model predicts (joint layers and two-stream blocks: image and text tokens) is what was held
    shapes = [engine.shapes.get(i) for i in range(len(engine.layers))]
    assert cache_elements(loaded, shapes) * 4 == engine.peak_cache_bytes > 0


def naive_joint_attention(attn, x, e, w=None, image_first=True, rotary=None):
    """Joint attention written out, explicit scores: SD3 ([image | text], the text through add_*_proj) or CogVideoX
    ([text | video], one set of projections on the joined sequence). With `w`, image query i sees the image keys
    |i - j| <= w and every text key, text queries see everything. (B, H, L, D) in the model's token order. SD3.5's
    attn2 (e None): the image tokens alone."""
    b, n, t = x.shape[0], x.shape[1], (0 if e is None else e.shape[1])

    def heads(y):
        return y.reshape(b, y.shape[1], attn.heads, -1).transpose(1, 2)

    def norm(f, y):
        return y if f is None else f(y)

    if e is None:
        q, k, v = norm(attn.norm_q, heads(attn.to_q(x))), norm(attn.norm_k, heads(attn.to_k(x))), heads(attn.to_v(x))
        image = torch.ones(n, dtype=torch.bool)
    elif image_first:
        q = torch.cat([norm(attn.norm_q, heads(attn.to_q(x))), norm(attn.norm_added_q, heads(attn.add_q_proj(e)))], 2)
        k = torch.cat([norm(attn.norm_k, heads(attn.to_k(x))), norm(attn.norm_added_k, heads(attn.add_k_proj(e)))], 2)
        v = torch.cat([heads(attn.to_v(x)), heads(attn.add_v_proj(e))], 2)
        image = torch.arange(n + t) < n
    else:
        h = torch.cat([e, x], 1)
        q, k, v = norm(attn.norm_q, heads(attn.to_q(h))), norm(attn.norm_k, heads(attn.to_k(h))), heads(attn.to_v(h))
        if rotary is not None:  # RoPE on the video tokens (CogVideoX-5b)
            from diffusers.models.embeddings import apply_rotary_emb

            q = torch.cat([q[:, :, :t], apply_rotary_emb(q[:, :, t:], rotary)], 2)
            k = torch.cat([k[:, :, :t], apply_rotary_emb(k[:, :, t:], rotary)], 2)
        image = torch.arange(n + t) >= t
    scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    if w is not None:
        pos = torch.cumsum(image.long(), 0)  # position among the image tokens
        far = (pos[:, None] - pos[None, :]).abs() > w
        scores = scores.masked_fill(image[:, None] & image[None, :] & far, float("-inf"))
    return (scores.softmax(-1) @ v.double()).float()


def naive_flux_attention(attn, x, e, rotary, w=None, text=None):
    """FLUX's joint attention written out: [text | image], the text of a double-stream layer through add_*_proj, RoPE on
    the whole sequence; a single-stream layer (e None) gets the joined sequence with `text` text tokens first. With
    `w`, image query i sees the image keys |i - j| <= w and every text key. (B, H, L, D)."""
    from diffusers.models.embeddings import apply_rotary_emb

    def heads(y):
        return y.unflatten(-1, (attn.heads, -1))  # (B, L, H, D)

    q, k, v = attn.norm_q(heads(attn.to_q(x))), attn.norm_k(heads(attn.to_k(x))), heads(attn.to_v(x))
    if e is not None:
        text = e.shape[1]
        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(e))), q], 1)
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(e))), k], 1)
        v = torch.cat([heads(attn.add_v_proj(e)), v], 1)
    q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    q, k, v = (y.transpose(1, 2).double() for y in (q, k, v))  # (B, H, L, D)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if w is not None:
        i = torch.arange(q.shape[2]) - text  # position among the image tokens (text: negative)
        image = i >= 0
        scores = scores.masked_fill(image[:, None] & image[None, :] & ((i[:, None] - i[None, :]).abs() > w),
                                    float("-inf"))
    return (scores.softmax(-1) @ v).float()


def naive_flux_out(attn, o, e):
    """A double-stream layer's (image, text): to_out on the image, to_add_out on the text; a single-stream layer's
    joined sequence as it is."""
    y = o.transpose(1, 2).flatten(2)
    if e is None:
        return (y,)
    t = e.shape[1]
    return attn.to_out[0](y[:, t:]), attn.to_add_out(y[:, :t])


def naive_joint_out(attn, o, n, image_first=True, text=True):
    """(image, text) from the joint attention output o (B, H, L, D). SD3: to_out on the image, to_add_out on the text
    (none in its last block, context_pre_only); CogVideoX: to_out on the joined sequence. No text (SD3.5's attn2):
    (to_out of the image,)."""
    y = o.transpose(1, 2).flatten(2)
    if not text:
        return (attn.to_out[0](y),)
    if not image_first:
        y = attn.to_out[0](y)
        return y[:, -n:], y[:, :-n]
    image, text = attn.to_out[0](y[:, :n]), y[:, n:]
    return image, (text if attn.context_pre_only else attn.to_add_out(text))


def tiny_cogvideox_rope():
    """The tiny CogVideoX with the 5b's rotary position embeddings on the video tokens."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    from difa.tiny import TINY_COGVIDEOX

    pipe = tiny("cogvideox")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CogVideoXTransformer3DModel(**{**TINY_COGVIDEOX, "use_rotary_positional_embeddings": True}).eval()
    pipe = CogVideoXPipeline(**{**pipe.components, "transformer": model})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["sd3", "sd35", "flux", "cogvideox", "cogvideox+rope"])
def test_joint_window_attention_matches_naive_reference(family):
    """wars on the joint layers (window 1 token per side over the image / video tokens, text attending fully): step 0
    full (bit-exact with the stock processor while it caches R = O_full - O_window), then O_window + R of the last
    full step, for both parts of the output; ast in between. FLUX: double- and single-stream layers, RoPE on all."""
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    rope = family.endswith("+rope")
    family = family.split("+")[0]
    pipe = tiny_cogvideox_rope() if rope else tiny(family)
    image_first = family in SD3
    pattern = ["full", "wars", "wars", "ast", "full", "wars"]
    plan = fixed_plan(pipe, lambda i, t: pattern[t], steps=STEPS, guidance_scale=GUIDANCE[family], window=1)
    layers = plan_layers(pipe)[2]
    assert all(row == tuple(pattern) for row in plan.methods)
    calls, handles = record([m for _, m in layers])
    engine = difa.apply_plan(pipe, plan)
    try:
        generate(pipe, family)
    finally:
        for h in handles:
            h.remove()
        difa.remove_plan(pipe)
    for i, seen in enumerate(calls):  # the cost model: joint tokens, the text ones attended fully under the window
        shape, kw = engine.shapes[i], seen[0][1]
        joined = family == "flux"  # a layer without encoder_hidden_states: FLUX single-stream, or SD3.5's attn2
        text = (kw["encoder_hidden_states"].shape[1] if kw.get("encoder_hidden_states") is not None
                else TEXT_TOKENS if joined else 0)
        n = shape.n_q - text
        assert shape.text == text and shape.n_q == shape.n_kv == kw["hidden_states"].shape[1] + (
            0 if kw.get("encoder_hidden_states") is None else text)
        pos = torch.arange(n)
        band = int(((pos[:, None] - pos[None, :]).abs() <= 1).sum())
        assert wars.window_pairs(shape, plan.techniques) == band + text * (n + shape.n_q)
    if family == "flux":
        check_flux_window(layers, calls, FluxAttnProcessor())
        return
    stock = JointAttnProcessor2_0() if image_first else CogVideoXAttnProcessor2_0()
    textless = 0
    for (name, attn), seen in zip(layers, calls):
        xs = [(kw["hidden_states"], kw.get("encoder_hidden_states")) for _, kw, _ in seen]
        rotary = seen[0][1].get("image_rotary_emb")
        assert (rotary is not None) == rope  # the tiny CogVideoX is 2b-like: no RoPE unless asked
        outs = [o if isinstance(o, tuple) else (o,) for _, _, o in seen]  # SD3.5's attn2: one tensor
        has_text = xs[0][1] is not None
        textless += not has_text
        n = xs[0][0].shape[1]
        kw = {"image_rotary_emb": rotary} if rope else {}
        ref = stock(attn, *xs[0], **kw)
        ref = ref if isinstance(ref, tuple) else (ref,)
        assert len(ref) == len(outs[0]) and all(torch.equal(a, b) for a, b in zip(outs[0], ref)), name  # full + R

        def joint(s, w=None, attn=attn, xs=xs, rotary=rotary):
            return naive_joint_attention(attn, *xs[s], w=w, image_first=image_first, rotary=rotary)
        r = {s: joint(s) - joint(s, 1) for s in (0, 4)}
        expected = {s: naive_joint_out(attn, joint(s, 1) + r[last], n, image_first, has_text)
                    for s, last in ((1, 0), (2, 0), (5, 4))}
        expected[3] = outs[2]
        for s, e in expected.items():
            assert len(outs[s]) == len(e), f"{name} step {s}"
            for part, got, want in zip(("image", "text"), outs[s], e):
                if got is None and want is None:  # SD3's last block: no text out
                    continue
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=f"{name} step {s} {part}")
        full1 = naive_joint_out(attn, joint(1), n, image_first, has_text)
        assert (outs[1][0] - full1[0]).abs().max() > 1e-4  # the window changed something
    assert textless == (2 if family == "sd35" else 0)  # SD3.5's attn2 layers were checked too


def check_flux_window(layers, calls, stock):
    """The FLUX half of test_joint_window_attention_matches_naive_reference."""
    singles = 0
    for (name, attn), seen in zip(layers, calls):
        rotary = seen[0][1]["image_rotary_emb"]
        xs = [(kw["hidden_states"], kw.get("encoder_hidden_states")) for _, kw, _ in seen]
        outs = [o if isinstance(o, tuple) else (o,) for _, _, o in seen]
        singles += xs[0][1] is None
        ref = stock(attn, *xs[0], None, rotary)  # called positionally, as FluxAttention does
        ref = ref if isinstance(ref, tuple) else (ref,)
        assert len(ref) == len(outs[0]) and all(torch.equal(a, b) for a, b in zip(outs[0], ref)), name  # full + R

        def joint(s, w=None, attn=attn, xs=xs, rotary=rotary):
            return naive_flux_attention(attn, *xs[s], rotary, w=w, text=TEXT_TOKENS)
        r = {s: joint(s) - joint(s, 1) for s in (0, 4)}
        expected = {s: naive_flux_out(attn, joint(s, 1) + r[last], xs[s][1]) for s, last in ((1, 0), (2, 0), (5, 4))}
        expected[3] = outs[2]
        for s, e in expected.items():
            for part, got, want in zip(("image", "text"), outs[s], e):
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=f"{name} step {s} {part}")
        assert (outs[1][0] - naive_flux_out(attn, joint(1), xs[1][1])[0]).abs().max() > 1e-4
    assert singles == 3


def test_cli_calibrates_and_generates_every_tiny_family(fam, tmp_path):
    """`python -m difa.calibrate +model=tiny_<family>` then `python -m difa.generate plan=...`, in-process."""
    from difa.cli import calibrate as calibrate_cli
    from difa.cli import generate as generate_cli
    from tests.test_cli import config

    plan_path = tmp_path / "plan.json"
    plan, _ = calibrate_cli.run(config("calibrate", [f"+model=tiny_{fam}", "threshold=0.05", "steps=4", "n_calib=2",
                                                     f"out={plan_path}"]))
    assert plan.model.family == family_of(fam) and plan_path.is_file()
    images, out = generate_cli.run(config("generate", [f"plan={plan_path}", "n=2", f"out={tmp_path / 'out'}"]))
    assert len(images) == 2 and (out / "grid.png").is_file()
    assert (out / ("000.gif" if fam == "cogvideox" else "000.png")).is_file()


def test_hub_configs_load_through_from_pretrained(fam, tmp_path):
    """`+model=<family>` (the hub config) with model.path=<a save_pretrained dir of the tiny model>: the real loading
    path and pipeline class, at the tiny sizes."""
    from difa.cli import calibrate as calibrate_cli
    from tests.test_cli import config

    local = tmp_path / fam
    tiny(fam).save_pretrained(local)
    overrides = [f"+model={fam}", f"model.path={local}", "steps=3", "n_calib=1", f"out={tmp_path / 'p.json'}",
                 "threshold=0.05"]
    overrides += [f"++model.call_kwargs.{k}={v}" for k, v in tiny_call_kwargs(fam).items()]  # tiny sizes
    plan, _ = calibrate_cli.run(config("calibrate", overrides))
    assert plan.model.name == fam and plan.model.family == family_of(fam) and plan.inference_steps == 3
