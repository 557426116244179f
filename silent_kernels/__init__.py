"""silent_kernels: the exact expected reconstruction loss of a VAE with a linear
Gaussian decoder ("Silent Gradients"), with zero-variance encoder gradients.

    from silent_kernels import analytic_nll, LatentMoments
    loss = analytic_nll(x, LatentMoments.gaussian(mu, logvar), decoder.weight, decoder.bias, sigma2=0.01)
"""

from .backends import info
from .functional import analytic_nll
from .moments import LatentMoments, as_latent_moments
from .reference import PRECISION_SQ_FLOOR

__version__ = "0.1.0"

__all__ = ["analytic_nll", "LatentMoments", "as_latent_moments", "info", "PRECISION_SQ_FLOOR", "__version__"]
