"""``python -m pyro_ldvae`` runs the ``pyro-ldvae`` command (also under torchrun)."""

import sys

from .api.cli import main

sys.exit(main())
