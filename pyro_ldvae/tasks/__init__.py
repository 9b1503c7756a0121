"""Posterior quantities computed from the trained program: expression, likelihoods, DE, factor summaries."""
