"""What bounds the bundled models' FID: real train images and their VAE reconstructions against the test split,
with the same FID code as `python -m difa.evaluate` (n images against the first ref_n test images).

    python experiments/fid_bounds.py --n 2000 --ref-n 10000
"""

from __future__ import annotations

import argparse

import torch
from diffusers import AutoencoderKL

from difa import data, fid
from difa.cli.common import report_errors
from difa.models import resolve_path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--ref-n", type=int, default=None, help="test images to compare against (default: --n)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, _ = data.load_fmnist("train")  # needs the Debian package dataset-fashion-mnist
    x = data.to_model_space(x[: args.n])  # (n, 3, 32, 32) in [-1, 1]
    vae = AutoencoderKL.from_pretrained(resolve_path("data/models/fmnist-vae")).eval()
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    net = fid.load_fid_inception()
    ref_n = args.ref_n or args.n
    ref = fid.reference_features(ref_n, "runs/cache", net)
    for name, images in (("real train images", x), ("VAE reconstructions (posterior mean)", recon)):
        feats = fid.inception_features((images + 1) / 2, net=net)
        print(f"FID {args.n} {name} vs {ref_n} test images: {fid.fid_from_features(feats, ref):.1f}", flush=True)


if __name__ == "__main__":
    report_errors(main)
