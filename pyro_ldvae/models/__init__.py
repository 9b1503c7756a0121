"""The LDVAE Pyro program (model and guide), its likelihoods, priors and networks."""
