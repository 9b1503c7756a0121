"""pyro_ldvae: the linearly decoded VAE (LDVAE) for single-cell counts, as a Pyro program.

The package is layered; each subpackage imports only from those listed before it:
``kernels`` (tensor numerics) <- ``data`` <- ``models`` <- ``infer``, ``tasks`` <- ``api``.
"""

import sys

from ._version import __version__
from .api import datasets, pl, tl
from .api.linear_scvi import LinearSCVI
from .api.simulate import simulate
from .data.minibatch import Minibatch
from .data.programs import read_gmt
from .models import priors
from .models.ldvae import LDVAE

# The public modules keep their short import paths: ``from pyro_ldvae.priors import Horseshoe``.
for _name, _module in {"datasets": datasets, "pl": pl, "tl": tl, "priors": priors}.items():
    sys.modules[f"{__name__}.{_name}"] = _module

__all__ = ["LDVAE", "LinearSCVI", "Minibatch", "datasets", "pl", "priors", "read_gmt", "simulate", "tl", "__version__"]
