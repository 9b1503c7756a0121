"""Pure tensor numerics, no Pyro: sparse count containers, CSR helpers, sparse and narrow linear maps."""
