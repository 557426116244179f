"""pythae's ``VAE`` with a linear decoder, trained on the exact expected reconstruction loss.

    pip install pythae        # into an environment that already has torch and silent_kernels
    python examples/pythae_exact_vae.py --data ../shared/data/mnist --loss exact
    python examples/pythae_exact_vae.py --data ../shared/data/mnist --loss sampled   # pythae's own VAE

``ExactLossVAE`` subclasses pythae's ``VAE`` and overrides only ``loss_function``: pythae's "mse"
reconstruction loss is 0.5 * ||x - decoder(z)||^2 at one sampled z, i.e. a unit-variance Gaussian
decoder without its constant; with a linear decoder its expectation over z is
``analytic_nll(..., sigma2=1.0)`` minus that constant, so the override returns the same
quantity as pythae's loss, without the sampling noise. The rest of pythae (``TrainingPipeline``,
saving, the trainer's logging) is untouched.

Reloading: pythae's ``AutoModel.load_from_folder`` rebuilds a plain ``VAE`` from the saved
config, so a model reloaded that way silently trains on the sampled loss again. Load with the
subclass instead, ``ExactLossVAE.load_from_folder(folder)`` (``load_exact_vae`` below), as
``--resume FOLDER`` does; after training the script also reloads the saved model both ways and
reports which class each gives.

At the end it prints the held-out ELBO (nats per image under pythae's unit-variance Gaussian
decoder, higher is better), computed exactly for either training loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time

import torch
from torch import nn

from pythae.models import VAE, AutoModel, VAEConfig
from pythae.models.base.base_utils import ModelOutput
from pythae.models.nn import BaseDecoder
from pythae.pipelines import TrainingPipeline
from pythae.trainers import BaseTrainerConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mnist_idx import load_images  # noqa: E402

from silent_kernels import LatentMoments, analytic_nll  # noqa: E402

IMAGE_SHAPE = (1, 28, 28)
PIXELS = math.prod(IMAGE_SHAPE)


class LinearDecoder(BaseDecoder):
    """p(x|z) mean W z + b: the one decoder form the exact loss covers."""

    def __init__(self, latent_dim: int):
        BaseDecoder.__init__(self)
        self.linear = nn.Linear(latent_dim, PIXELS)

    def forward(self, z: torch.Tensor):
        return ModelOutput(reconstruction=self.linear(z).reshape(-1, *IMAGE_SHAPE))


class ExactLossVAE(VAE):
    """pythae's VAE whose reconstruction loss is the exact expectation over z."""

    def loss_function(self, recon_x, x, mu, log_var, z):
        if self.model_config.reconstruction_loss != "mse":
            raise ValueError(f"model_config.reconstruction_loss: ExactLossVAE needs 'mse' (a Gaussian "
                             f"decoder), got {self.model_config.reconstruction_loss!r}")
        linear = getattr(self.decoder, "linear", None)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"decoder: ExactLossVAE needs a decoder whose `linear` attribute is the "
                            f"nn.Linear producing the mean, got {type(self.decoder).__name__}")
        q = LatentMoments.gaussian(mu, logvar=log_var)
        recon_loss = (analytic_nll(x, q, linear.weight, linear.bias, sigma2=1.0, reduction="none")
                      - 0.5 * x[0].numel() * math.log(2 * math.pi))   # pythae's "mse" leaves it out
        kld = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp(), dim=-1)
        return (recon_loss + kld).mean(dim=0), recon_loss.mean(dim=0), kld.mean(dim=0)


def load_exact_vae(folder: str) -> ExactLossVAE:
    """Reload a saved ExactLossVAE. Not AutoModel.load_from_folder: that returns a plain VAE."""
    return ExactLossVAE.load_from_folder(folder)


def build_model(loss: str, latent_dim: int) -> VAE:
    config = VAEConfig(input_dim=IMAGE_SHAPE, latent_dim=latent_dim, reconstruction_loss="mse")
    model_class = ExactLossVAE if loss == "exact" else VAE
    return model_class(config, decoder=LinearDecoder(latent_dim))   # pythae's default MLP encoder


@torch.no_grad()
def heldout_elbo(model: VAE, images: torch.Tensor, batch_size: int = 1000) -> float:
    """The exact ELBO per image (nats) under a unit-variance Gaussian decoder, averaged."""
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        out = model.encoder(x)
        mu, log_var = out.embedding, out.log_covariance
        linear = model.decoder.linear
        nll = analytic_nll(x, LatentMoments.gaussian(mu, logvar=log_var), linear.weight, linear.bias, sigma2=1.0,
                           reduction="sum")
        kld = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp())
        total -= (nll + kld).item()
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
    ap.add_argument("--latent-dim", type=positive_int, default=16)
    ap.add_argument("--batch-size", type=positive_int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--train-limit", type=positive_int, default=None, help="use the first N training images")
    ap.add_argument("--test-limit", type=positive_int, default=None, help="use the first N test images")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--output-dir", default=None, help="pythae's training folder (default: a temporary one)")
    ap.add_argument("--resume", default=None, metavar="FOLDER",
                    help="continue from a saved model's weights (an earlier run's final_model folder)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if not args.lr > 0:
        ap.error(f"--lr: must be positive, got {args.lr}")
    if args.resume and not os.path.isfile(os.path.join(args.resume, "model_config.json")):
        ap.error(f"--resume: {args.resume!r} is not a saved pythae model folder (no model_config.json)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    for name in list(logging.root.manager.loggerDict):   # pythae sets INFO on each module's logger
        if name.startswith("pythae"):
            logging.getLogger(name).setLevel(logging.WARNING)
    train = load_images(args.data, "train", args.train_limit).float() / 255.0
    test = load_images(args.data, "test", args.test_limit).float() / 255.0
    if args.resume:   # the workaround: reload through the subclass, not AutoModel
        model = load_exact_vae(args.resume) if args.loss == "exact" else VAE.load_from_folder(args.resume)
    else:
        torch.manual_seed(args.seed)   # the initial weights; pythae's trainer seeds the data order
        model = build_model(args.loss, args.latent_dim)
    with tempfile.TemporaryDirectory() as scratch:
        training_config = BaseTrainerConfig(
            output_dir=args.output_dir or scratch, num_epochs=args.epochs, learning_rate=args.lr,
            per_device_train_batch_size=args.batch_size, optimizer_cls="Adam", seed=args.seed,
            no_cuda=args.device == "cpu")
        pipeline = TrainingPipeline(model=model, training_config=training_config)
        start = time.perf_counter()
        pipeline(train_data=train)
        seconds = time.perf_counter() - start
        final = os.path.join(pipeline.trainer.training_dir, "final_model")
        trained = pipeline.trainer.model.cpu()
        elbo = heldout_elbo(trained, test)

        reloaded_auto = type(AutoModel.load_from_folder(final)).__name__
        reloaded = load_exact_vae(final) if args.loss == "exact" else VAE.load_from_folder(final)
        same = heldout_elbo(reloaded, test) == elbo
    print(f"held-out ELBO {elbo:.2f} nats/image on {test.shape[0]} test images ({args.loss} loss, "
          f"{args.epochs} epochs on {train.shape[0]} images, {seconds:.0f} s)")
    print(f"reloaded: AutoModel.load_from_folder gives {reloaded_auto}; {type(reloaded).__name__}."
          f"load_from_folder gives {type(reloaded).__name__} (same ELBO: {same})")
    result = {"loss": args.loss, "epochs": args.epochs, "seed": args.seed, "latent_dim": args.latent_dim,
              "train_images": train.shape[0], "test_images": test.shape[0], "batch_size": args.batch_size,
              "lr": args.lr, "heldout_elbo": elbo, "seconds": seconds, "automodel_reload_class": reloaded_auto,
              "reload_class": type(reloaded).__name__, "reload_same_elbo": same,
              "trained_class": type(trained).__name__, "final_model": final if args.output_dir else None}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
