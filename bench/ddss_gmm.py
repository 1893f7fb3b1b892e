"""DDSS on the analytic Fashion-MNIST mixture: learned GGDM samplers vs DDIM at the same K.

The mixture (``model=gmm_fmnist``: 30 low-rank Gaussians in 784-d, fitted in seconds, cached under
``.cache``) has an exact denoiser and an exact density, so "closer to the true distribution" is
measurable: the mean exact log-likelihood of the samples (nats per pixel; exact samples of the mixture
score ``true samples``) and the KID of held-out features (a seeded random CNN that is never optimized)
against exact samples. DDSS trains GGDM+PRED+TIME (+ noise scales), initialized at DDIM on the named
grid, by minimizing KID between features of its samples and of exact mixture samples (batches of 128,
Adam), with per-seed noise.

Loss features (``--loss``): ``white`` (default) are pixels whitened with the mixture's exact covariance
(PCA whitening: a fixed linear map; the density itself is never used); ``pixels`` are raw pixels.
Raw-pixel KID rewards adding isotropic noise (it fills the variance deficit of blurry few-step samples
in the Frobenius norm of the second moments), which the exact likelihood punishes; whitening weighs
every direction by its own scale. ``python bench/ddss_gmm.py --ks 5,10``; one thread, CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch import Tensor

from fastsample.metrics import kid
from fastsample.metrics.feature_loss import ddss_loss, image_features, random_conv_features
from fastsample.models.gmm import GaussianMixture
from fastsample.samplers import Sampler
from fastsample.samplers.ggdm import GGDMSampler
from fastsample.utils.instantiation import instantiate
from fastsample.utils.seeding import SeedNoise

ROOT = Path(__file__).resolve().parents[1]
EVAL_SEED = 10**9  # evaluation seeds start here; training seeds are 0, 1, ...


def mixture() -> GaussianMixture:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=["model=gmm_fmnist"])
    return instantiate(cfg.model)


def whitening(model: GaussianMixture) -> tuple[Tensor, Tensor]:
    """Mean and whitening matrix of the mixture's exact covariance (float32)."""
    weights = model.log_weights.exp()
    mean = (weights[:, None] * model.means).sum(0)
    eye = torch.eye(model.dim, dtype=torch.float64)
    covariance = -torch.outer(mean, mean)
    for k in range(len(weights)):
        basis = model.bases[k]
        component = basis @ torch.diag(model.var_top[k]) @ basis.T + model.var_rest[k] * (
            eye - basis @ basis.T
        )
        covariance += weights[k] * (component + torch.outer(model.means[k], model.means[k]))
    values, vectors = torch.linalg.eigh(covariance)
    return mean.float(), (vectors / values.sqrt()).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default="5,10", help="step counts K (empty: only the exact-samples row)")
    parser.add_argument("--inits", default="time_uniform,quadratic", help="initial DDIM grids")
    parser.add_argument("--loss", default="white", choices=["white", "pixels"])
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--eval", type=int, default=1000, help="evaluation samples")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = mixture()
    shape, dim = model.image_shape, model.dim
    held_out = random_conv_features(seed=0)
    truth, _ = model.sample(2 * args.eval, torch.Generator().manual_seed(123))
    truth = truth.float()
    mean, white = whitening(model)
    features = {"white": lambda x: (x.flatten(1) - mean) @ white, "pixels": lambda x: x.flatten(1)}[args.loss]
    held_out_truth = image_features(held_out, truth[: args.eval])

    def scores(samples: Tensor) -> tuple[float, float, float]:
        loglik = float(model.log_prob(samples.double()).mean()) / dim
        kid_conv = kid(image_features(held_out, samples), held_out_truth, subsets=10)[0]
        kid_pixels = kid(samples.flatten(1), truth[args.eval :].flatten(1), subsets=10)[0]
        return loglik, kid_conv, kid_pixels

    def evaluate(sampler) -> tuple[float, float, float]:
        chunks = []
        with torch.no_grad():
            for start in range(0, args.eval, 250):
                source = SeedNoise(range(EVAL_SEED + start, EVAL_SEED + min(start + 250, args.eval)))
                chunks.append(sampler.sample(model, source.randn(shape), generator=source))
        return scores(torch.cat(chunks))

    rows: list[tuple] = []

    def add(*row) -> None:  # each row is printed as soon as it is measured (runs take minutes)
        rows.append(row)
        print(format_row(*row), flush=True)

    # the reference row: a third, independent set of exact samples (KID's noise floor)
    exact, _ = model.sample(args.eval, torch.Generator().manual_seed(456))
    add("true samples (exact)", "-", "-", *scores(exact.float()))
    for steps in [int(k) for k in args.ks.split(",") if k]:
        for kind in ("time_uniform", "quadratic"):
            add(f"DDIM {kind}", steps, "-", *evaluate(Sampler("ddim", steps, schedule=kind)))
        for kind in args.inits.split(","):
            sampler = GGDMSampler.from_schedule(model, steps, kind)
            optimizer = torch.optim.Adam(sampler.parameters(), lr=args.lr)
            start = time.perf_counter()
            for step in range(args.train_steps):
                seeds = range(step * args.batch, (step + 1) * args.batch)
                real, _ = model.sample(args.batch, torch.Generator().manual_seed(10**6 + step))
                loss = ddss_loss(sampler, model, features, real.float(), seeds, checkpoint=False)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            seconds = time.perf_counter() - start
            name = f"GGDM+PRED+TIME, DDSS ({args.loss}) from {kind}"
            add(name, steps, f"{seconds:.0f}", *evaluate(sampler))
            levels = ", ".join(f"{s:.3g}" for s in sampler.sigmas().tolist())
            print(f"K={steps} from {kind}: learned levels [{levels}]", flush=True)
    print(
        f"\nanalytic Fashion-MNIST mixture, {args.eval} samples; DDSS: {args.train_steps} Adam steps of "
        f"{args.batch}, lr {args.lr}, loss features {args.loss}\n"
    )
    print("| sampler | K (NFE) | DDSS train s | log-lik / pixel | KID held-out conv (x1e3) ", end="")
    print("| KID pixels (x1e3) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(format_row(*row))


def format_row(name: str, steps, seconds, loglik: float, kid_conv: float, kid_pixels: float) -> str:
    return f"| {name} | {steps} | {seconds} | {loglik:.3f} | {1e3 * kid_conv:.2f} | {1e3 * kid_pixels:.2f} |"


if __name__ == "__main__":
    main()
