"""pyro_ldvae: the linearly decoded VAE (LDVAE) for single-cell counts, as a Pyro program."""

from . import datasets, pl, priors, tl
from .model import LinearSCVI
from .module import LDVAE, Minibatch
from .simulate import simulate

__version__ = "0.1.0"
__all__ = ["LDVAE", "LinearSCVI", "Minibatch", "datasets", "pl", "priors", "simulate", "tl", "__version__"]
