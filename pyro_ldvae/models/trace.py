"""The one walk over a guide trace and the model replayed on it: ``log p - log q`` site by site.

The ELBO, the importance weights and the marginal likelihood are all sums of the same per-site
terms; they differ only in whether a latent site's term is its analytic ``-KL(q || p)`` (the ELBO,
as ``TraceMeanField_ELBO``) or ``log p - log q`` at the guide's draw (importance weights), and in
whether the plate's scale and the KL warm-up weigh it.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch
from pyro import poutine
from pyro.poutine import Trace
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

Site = dict[str, Any]


def replayed_traces(
    model: Callable,
    guide: Callable,
    guide_args: tuple,
    model_args: tuple | None = None,
    uncondition: bool = False,
) -> tuple[Trace, Trace]:
    """The guide's trace, and the model's replayed on the guide's draws (``model_args`` default to ``guide_args``.

    ``uncondition`` draws the observed sites instead of scoring them).
    """
    guide_trace = poutine.trace(guide).get_trace(*guide_args)
    replayed = poutine.replay(model, trace=guide_trace)
    if uncondition:
        replayed = poutine.uncondition(replayed)
    model_trace = poutine.trace(replayed).get_trace(*(guide_args if model_args is None else model_args))
    return guide_trace, model_trace


def site_terms(model_trace: Trace, guide_trace: Trace, analytic_kl: bool) -> Iterator[tuple[Site, torch.Tensor]]:
    """``(site, term)`` for every random sample site of the model, unweighted, in trace order.

    An observed site's term is ``log p(x | ...)``. A latent site's is ``-KL(q || p)`` when
    ``analytic_kl`` and torch knows the pair, else ``log p - log q`` at the guide's draw. The
    plate's subsample sites (log-density 0) and deterministic sites carry no term.
    """
    for name, site in model_trace.nodes.items():
        # pyro.deterministic marks its sites with this infer key; Pyro 1.9 has no public predicate for it.
        if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get("_deterministic"):
            continue
        if site["is_observed"]:
            yield site, site["fn"].log_prob(site["value"])
            continue
        guide_site = guide_trace.nodes[name]
        if analytic_kl:
            try:
                yield site, -kl_divergence(guide_site["fn"], site["fn"])
                continue
            except NotImplementedError:
                pass
        yield site, site["fn"].log_prob(site["value"]) - guide_site["fn"].log_prob(guide_site["value"])


def weighted(term: torch.Tensor, scale: float | torch.Tensor, mask: bool | torch.Tensor | None) -> torch.Tensor:
    """``term`` times the site's ``scale``, zero where ``mask`` is False (Pyro's rule for a site's weight).

    A 0-dim tensor ``scale`` (the CUDA-graph step's KL weight) multiplies as it is: comparing it
    with 1 would read it back to the host.
    """
    if mask is None and isinstance(scale, numbers.Number) and scale == 1:
        return term
    if mask is None or mask is True:
        return term * scale
    if mask is False:
        return torch.zeros_like(term)
    return torch.where(mask, term * scale, term.new_zeros(()))


def mean_field_elbo(model_trace: Trace, guide_trace: Trace, plate: str = "cells") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-field ELBO with analytic KL where available, as ``TraceMeanField_ELBO``.

    Returns ``(elbo, per_item)``: ``elbo`` sums every term weighted by its site's scale and mask
    (the differentiable full-data estimate); ``per_item`` sums the unweighted terms of the sites
    inside ``plate``, one value per member of the plate.
    """
    total, per_item = 0.0, 0.0
    for site, term in site_terms(model_trace, guide_trace, analytic_kl=True):
        total = total + weighted(term, site["scale"], site["mask"]).sum()
        if any(frame.name == plate for frame in site["cond_indep_stack"]):
            per_item = per_item + term
    return total, per_item


def log_weight(model_trace: Trace, guide_trace: Trace) -> torch.Tensor:
    """Importance log-weight ``log p(x, z) - log q(z | x)`` at the guide's draws, unweighted by any scale.

    Terms of sites outside the plates broadcast over its members.
    """
    total = 0.0
    for _, term in site_terms(model_trace, guide_trace, analytic_kl=False):
        total = total + term
    return total
