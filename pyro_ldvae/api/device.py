"""Where a model runs: ``accelerator`` and ``device`` as scvi-tools takes them."""

from __future__ import annotations

import torch

from ..infer.options import Accelerator


def resolve_device(accelerator: Accelerator = "auto", device: str | int = "auto") -> torch.device:
    """'auto' picks CUDA when present; ``device`` may name an index ('cuda:1', 1) or 'auto'."""
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise ValueError(f"accelerator must be 'auto', 'cpu', 'gpu' or 'cuda', got {accelerator!r}.")
    use_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"accelerator={accelerator!r} asks for a GPU but torch sees no CUDA device; use 'cpu'.")
    if not use_cuda:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda")
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
