"""The option strings of the model, as ``Literal`` types shared by ``LDVAE`` and ``LinearSCVI``.

The allowed values are those that ``data.validate.check_model_args`` accepts.
"""

from __future__ import annotations

from typing import Literal

GeneLikelihood = Literal["nb", "zinb", "poisson", "normal"]
Dispersion = Literal["gene", "gene-batch", "gene-label", "gene-cell"]
LatentDistribution = Literal["normal", "ln"]
