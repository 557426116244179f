"""A plain-PyTorch MNIST VAE with a linear decoder, trained with the sampled or the exact loss.

    python examples/mnist_linear_vae.py --data ../shared/data/mnist --loss exact
    python examples/mnist_linear_vae.py --data ../shared/data/mnist --loss sampled   # the usual way

The model is the familiar MNIST VAE (784-400 ReLU encoder to a 20-dimensional Gaussian
posterior) with the decoder made linear, p(x|z) = N(W z + b, sigma^2 I) with sigma^2 = 0.01 on
pixels scaled to [0, 1]. The usual loss draws one z per image (reparameterisation) and scores
the decoded image; with a linear decoder the expectation over z has a closed form, so the switch
to the exact loss is the two marked lines in ``loss_function``: the encoder then gets its
gradient with no sampling noise at all.

At the end it prints the held-out ELBO (nats per image, higher is better) on the test images.
It is computed exactly for either training loss (it is what a Monte Carlo ELBO estimates), so
the two runs are compared without evaluation noise. MNIST is read from IDX files in ``--data``
(``train-images-idx3-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mnist_idx import load_images  # noqa: E402

from silent_kernels import LatentMoments, analytic_nll  # noqa: E402

SIGMA2 = 0.01  # decoder variance on [0, 1] pixels
LOG_2PI = math.log(2 * math.pi)


class LinearDecoderVAE(nn.Module):
    def __init__(self, pixels: int = 784, hidden: int = 400, latent: int = 20):
        super().__init__()
        self.hidden = nn.Linear(pixels, hidden)
        self.to_mu = nn.Linear(hidden, latent)
        self.to_logvar = nn.Linear(hidden, latent)
        self.decoder = nn.Linear(latent, pixels)   # linear: what makes the exact loss possible

    def encode(self, x):
        h = F.relu(self.hidden(x))
        return self.to_mu(h), self.to_logvar(h)

    def reparameterize(self, mu, logvar):
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x):
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar


def gaussian_nll(x, mean):
    """-log N(x; mean, SIGMA2 I), summed over pixels and images."""
    return 0.5 * ((x - mean).square() / SIGMA2 + math.log(SIGMA2) + LOG_2PI).sum()


def kl_to_standard_normal(mu, logvar):
    return -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum()


def loss_function(model, x, recon, mu, logvar, exact: bool):
    """Negative ELBO summed over the batch: reconstruction NLL + KL."""
    if exact:   # the switch: E_q[-log p(x|z)] in closed form instead of one sample
        q = LatentMoments.gaussian(mu, logvar=logvar)
        nll = analytic_nll(x, q, model.decoder.weight, model.decoder.bias, sigma2=SIGMA2, reduction="sum")
    else:
        nll = gaussian_nll(x, recon)
    return nll + kl_to_standard_normal(mu, logvar)


def as_pixels(images: torch.Tensor, device) -> torch.Tensor:
    return (images.flatten(1).float() / 255.0).to(device)


def train_epoch(model, optimizer, images, batch_size, order_gen, exact, device) -> float:
    model.train()
    total = 0.0
    for rows in torch.randperm(images.shape[0], generator=order_gen).split(batch_size):
        x = as_pixels(images[rows], device)
        optimizer.zero_grad()
        recon, mu, logvar = model(x)
        loss = loss_function(model, x, recon, mu, logvar, exact)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / images.shape[0]


@torch.no_grad()
def heldout_elbo(model, images, device, batch_size: int = 1000) -> float:
    """The exact ELBO per image (nats), averaged over `images`."""
    model.eval()
    total = 0.0
    for start in range(0, images.shape[0], batch_size):
        x = as_pixels(images[start:start + batch_size], device)
        mu, logvar = model.encode(x)
        total -= loss_function(model, x, None, mu, logvar, exact=True).item()
    return total / images.shape[0]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder with the MNIST IDX files")
    ap.add_argument("--loss", choices=("exact", "sampled"), default="exact")
    ap.add_argument("--epochs", type=positive_int, default=10)
    ap.add_argument("--batch-size", type=positive_int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--train-limit", type=positive_int, default=None, help="use the first N training images")
    ap.add_argument("--test-limit", type=positive_int, default=None, help="use the first N test images")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if not args.lr > 0:
        ap.error(f"--lr: must be positive, got {args.lr}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    train = load_images(args.data, "train", args.train_limit)
    test = load_images(args.data, "test", args.test_limit)
    torch.manual_seed(args.seed)
    order_gen = torch.Generator().manual_seed(args.seed)   # same data order for both losses
    model = LinearDecoderVAE().to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    exact = args.loss == "exact"
    start = time.perf_counter()
    history = []
    for epoch in range(1, args.epochs + 1):
        loss = train_epoch(model, optimizer, train, args.batch_size, order_gen, exact, args.device)
        history.append(loss)
        print(f"epoch {epoch}: train loss {loss:.2f} nats/image ({args.loss})", flush=True)
    elbo = heldout_elbo(model, test, args.device)
    result = {"loss": args.loss, "epochs": args.epochs, "seed": args.seed, "train_images": train.shape[0],
              "test_images": test.shape[0], "batch_size": args.batch_size, "lr": args.lr,
              "train_loss": history, "heldout_elbo": elbo, "seconds": time.perf_counter() - start}
    print(f"held-out ELBO {elbo:.2f} nats/image on {test.shape[0]} test images")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
