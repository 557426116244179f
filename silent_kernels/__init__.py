"""silent_kernels: the exact expected reconstruction loss of a VAE with a linear
Gaussian decoder ("Silent Gradients"), with zero-variance encoder gradients.

    from silent_kernels import analytic_nll, LatentMoments
    loss = analytic_nll(x, LatentMoments.gaussian(mu, logvar=logvar), decoder.weight, decoder.bias, sigma2=0.01)
"""

from . import nn
from .backends import info
from .functional import analytic_nll
from .moments import LatentMoments, as_latent_moments
from .reference import PRECISION_SQ_FLOOR
from .special import expected_log_square

__version__ = "0.2.0"

__all__ = ["analytic_nll", "LatentMoments", "as_latent_moments", "info", "nn", "expected_log_square",
           "PRECISION_SQ_FLOOR", "__version__"]
