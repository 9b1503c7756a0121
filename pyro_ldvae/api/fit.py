"""``LinearSCVI.train``'s work: options checked, cells split, the loop run, the history kept."""

from __future__ import annotations

from typing import Any

from ..data import validate
from ..data.minified import minify_type
from ..infer.options import TrainOptions
from ..infer.plan import split_cells
from ..infer.train import train_svi
from .device import resolve_device
from .history import append_history, keeping_history_on_fault, lightning_names


def fit(model: Any, options: TrainOptions) -> None:
    """Train ``model`` (a ``LinearSCVI``) with ``options``; set its split, history and stop reason.

    Keywords with no meaning here warn (``TrainOptions.resolved``); the split follows scvi-tools'
    ``DataSplitter``, including ``datasplitter_kwargs`` (``drop_last``, ``external_indexing``).
    """
    if minify_type(model.adata) is not None:
        raise ValueError(
            "This model's AnnData is minified (its counts were dropped by minify_adata): training needs the counts. "
            "Set model.adata to the full AnnData, or load the model with it, to train."
        )
    cells = model.get_cells(None)
    n_obs = cells.n_obs
    options = options.resolved()
    options = options.replace(
        max_epochs=options.epochs(n_obs), seed=model.seed if options.seed is None else options.seed
    )
    validate.check_train_args(
        options.max_epochs,
        options.batch_size,
        options.train_size,
        options.validation_size,
        options.gradient_clip_val,
        options.checkpoint_every,
    )
    plan = options.plan()  # bad plan_kwargs values fail here, before the split
    splitter = options.datasplitter_kwargs or {}
    train_idx, val_idx, test_idx = split_cells(
        n_obs,
        options.train_size,
        options.validation_size,
        options.batch_size,
        options.seed,
        options.shuffle_set_split,
        drop_last=bool(splitter.get("drop_last", False)),
        external_indexing=splitter.get("external_indexing"),
    )
    validate.check_split(n_obs, train_idx, options.batch_size)
    model.train_indices, model.validation_indices, model.test_indices = train_idx, val_idx, test_idx
    if options.resume_from is not None:
        model.history_ = {}  # the checkpoint carries the history of the epochs it holds
    device = resolve_device(options.accelerator, options.device)
    history = keeping_history_on_fault(model, train_svi)(model.module, cells, train_idx, val_idx, options, device)
    model.stop_reason_ = getattr(history, "stop_reason", "completed")
    model.history_ = append_history(model.history_, lightning_names(dict(history), plan.on_step, plan.on_epoch))
    model.module.eval()
    model.is_trained_ = True
