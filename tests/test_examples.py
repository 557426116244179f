"""The integrations in examples/ run, at tiny settings, on the real MNIST files in ../shared/data.

The plain-PyTorch example always runs; the pythae one only where pythae is installed (it is
not a dependency of this package)."""

import gzip
import importlib
import math
import os
import sys

import numpy as np
import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)
mnist_idx = importlib.import_module("mnist_idx")
mnist_linear_vae = importlib.import_module("mnist_linear_vae")

TINY = ["--train-limit", "300", "--test-limit", "200", "--epochs", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def mnist_dir(shared_data_dir):
    path = os.path.join(shared_data_dir, "mnist")
    if not os.path.isdir(path):
        pytest.skip(f"no MNIST folder at {path}")
    return path


def _monte_carlo(values: list) -> tuple:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std() / math.sqrt(len(values))).item()


# ------------------------------------------------------------------------ IDX reader

def _write_idx(path, images: np.ndarray, magic: int = 2051) -> None:
    header = np.array([magic, *images.shape], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + images.astype(np.uint8).tobytes())


def test_idx_reader_round_trip_limit_and_errors(tmp_path):
    images = np.arange(3 * 4 * 5).reshape(3, 4, 5) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    got = mnist_idx.load_images(str(tmp_path), "test")
    assert got.dtype == torch.uint8 and got.shape == (3, 1, 4, 5)
    assert torch.equal(got[:, 0], torch.from_numpy(images.astype(np.uint8)))
    assert mnist_idx.load_images(str(tmp_path), "test", limit=2).shape == (2, 1, 4, 5)
    with pytest.raises(FileNotFoundError, match="--data: no train-images-idx3-ubyte"):
        mnist_idx.load_images(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="--data: .* is not a folder"):
        mnist_idx.load_images(str(tmp_path / "missing"), "train")
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, magic=2049)
    with pytest.raises(ValueError, match="not an IDX image file"):
        mnist_idx.load_images(str(tmp_path), "train")


# ------------------------------------------------------------------------ plain PyTorch

@pytest.mark.parametrize("loss", ["exact", "sampled"])
def test_plain_pytorch_example_tiny_run(mnist_dir, loss, record_property):
    result = mnist_linear_vae.main(["--data", mnist_dir, "--loss", loss, *TINY])
    print(f"\n{loss}: held-out ELBO {result['heldout_elbo']:.2f} nats/image "
          f"({result['train_images']} train / {result['test_images']} test images, 1 epoch)")
    record_property(f"heldout_elbo_{loss}", result["heldout_elbo"])
    assert result["train_images"] == 300 and result["test_images"] == 200
    assert math.isfinite(result["heldout_elbo"]) and math.isfinite(result["train_loss"][-1])


def test_plain_pytorch_example_exact_loss_is_the_mean_of_the_sampled_loss(mnist_dir):
    """The example's two losses must estimate the same objective: the exact one is the
    expectation of the one-sample one (checked on real digits with an untrained model)."""
    torch.manual_seed(0)
    model = mnist_linear_vae.LinearDecoderVAE()
    x = mnist_linear_vae.as_pixels(mnist_idx.load_images(mnist_dir, "test", limit=8), "cpu")
    with torch.no_grad():
        mu, logvar = model.encode(x)
        logvar = logvar - 1.0   # a spread posterior, so the sampling noise is not negligible
        exact = mnist_linear_vae.loss_function(model, x, None, mu, logvar, exact=True).item()
        draws = [mnist_linear_vae.loss_function(model, x, model.decode(model.reparameterize(mu, logvar)),
                                                mu, logvar, exact=False).item() for _ in range(400)]
    mean, se = _monte_carlo(draws)
    assert se > 0
    assert abs(mean - exact) < 5 * se, (exact, mean, se)


def test_plain_pytorch_example_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        mnist_linear_vae.parse_args(["--data", str(tmp_path), "--epochs", "0"])
    with pytest.raises(FileNotFoundError, match="--data"):
        mnist_linear_vae.main(["--data", str(tmp_path), *TINY])


# ------------------------------------------------------------------------ pythae

def _pythae_example():
    pytest.importorskip("pythae", reason="pythae is not installed (pip install pythae to run this example)")
    return importlib.import_module("pythae_exact_vae")


def test_pythae_example_tiny_run_and_reload(mnist_dir, tmp_path, record_property):
    example = _pythae_example()
    result = example.main(["--data", mnist_dir, "--loss", "exact", "--output-dir", str(tmp_path), *TINY])
    print(f"\npythae exact: held-out ELBO {result['heldout_elbo']:.2f} nats/image")
    record_property("pythae_heldout_elbo_exact", result["heldout_elbo"])
    assert math.isfinite(result["heldout_elbo"])
    # the pitfall the example documents, and its workaround
    assert result["automodel_reload_class"] == "VAE"
    assert result["reload_class"] == "ExactLossVAE" and result["reload_same_elbo"]
    resumed = example.main(["--data", mnist_dir, "--loss", "exact", "--resume", result["final_model"],
                            "--output-dir", str(tmp_path / "resumed"), *TINY])
    assert resumed["trained_class"] == "ExactLossVAE" and math.isfinite(resumed["heldout_elbo"])


def test_pythae_override_is_the_mean_of_pythae_own_loss(mnist_dir):
    """ExactLossVAE.loss_function returns the expectation of pythae's VAE.loss_function."""
    example = _pythae_example()
    torch.manual_seed(0)
    model = example.build_model("exact", latent_dim=8)
    x = mnist_idx.load_images(mnist_dir, "test", limit=8).float() / 255.0
    with torch.no_grad():
        out = model.encoder(x)
        mu, log_var = out.embedding, out.log_covariance
        exact, exact_recon, exact_kld = model.loss_function(None, x, mu, log_var, None)
        draws = []
        for _ in range(400):
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
            recon = model.decoder(z)["reconstruction"]
            draws.append(example.VAE.loss_function(model, recon, x, mu, log_var, z)[0].item())
    mean, se = _monte_carlo(draws)
    assert abs(mean - exact.item()) < 5 * se + 1e-9, (exact.item(), mean, se)
    with pytest.raises(ValueError, match="reconstruction_loss"):
        model.model_config.reconstruction_loss = "bce"
        model.loss_function(None, x, mu, log_var, None)
