"""The ``pyro-ldvae`` command: fit LDVAE to an AnnData file, embed new cells with a saved model, show a result.

User mistakes (a missing file, an unknown key, an existing output) end with one line on stderr
and exit status 2, never a traceback, and no output file is left behind: outputs are written to
a temporary file next to the target and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import typing
from pathlib import Path

from . import cli_info

EPILOG = """examples:
  pyro-ldvae fit -o pbmc_ldvae.h5ad                      # the bundled PBMC dataset
  pyro-ldvae fit counts.h5ad -o out.h5ad --batch-key donor --n-latent 20 --save-model model_dir
  pyro-ldvae transform model_dir new_cells.h5ad -o new_cells_ldvae.h5ad
  pyro-ldvae info out.h5ad                               # settings, factors, top genes of a result

results: obsm['X_ldvae'] (cells x factors), varm['ldvae_loadings'] (genes x factors),
uns['ldvae'] (settings, training history, variance explained per factor)."""


class UserError(Exception):
    """A mistake in the command's arguments or inputs: reported in one line, no traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"pyro-ldvae: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _keys(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def _add_training_options(group: argparse._ArgumentGroup) -> None:
    """The ``TrainOptions`` that carry a ``cli`` flag, with their types, choices, defaults and help."""
    from ..infer.options import TrainOptions
    from ..infer.plan import TrainingPlan

    for option in dataclasses.fields(TrainOptions):
        flag, text = option.metadata.get("cli"), option.metadata["help"]
        if flag is None:
            continue
        kwargs: dict = {"dest": option.name, "default": option.default}
        choices = typing.get_args(typing.get_type_hints(TrainOptions)[option.name])
        if flag.startswith("--no-"):  # a bool | None option: the flag turns it off, else train() decides
            kwargs.update(action="store_const", const=False)
        elif option.default is False:
            kwargs.update(action="store_true")
        elif choices and all(isinstance(c, str) for c in choices):
            kwargs.update(choices=list(choices))
            text += f" (default {option.default})"
        else:
            kinds = set(choices) or {type(option.default)}
            kwargs.update(type=float if float in kinds else str if str in kinds else _positive_int)
            text += "" if option.default is None else f" (default {option.default})"
        group.add_argument(flag, help=text, **kwargs)
    group.add_argument(
        "--lr", type=float, default=TrainingPlan.lr, help=f"Adam learning rate (default {TrainingPlan.lr})"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-ldvae`` argument parser: subcommands ``fit``, ``transform``, ``info`` and ``map``."""
    parser = _Parser(
        prog="pyro-ldvae",
        description="LDVAE (linearly decoded variational autoencoder) for single-cell RNA-seq counts, in Pyro.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"pyro-ldvae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{fit,transform,info,map}", parser_class=_Parser)

    fit = sub.add_parser(
        "fit",
        help="fit LDVAE to an .h5ad file of raw counts (default: the bundled PBMC dataset)",
        description="Fit LDVAE to raw counts and write an .h5ad with the factors, loadings and training history.",
    )
    fit.add_argument("input", nargs="?", help="input .h5ad with raw counts; omitted: scanpy's bundled PBMC (700 cells)")
    fit.add_argument("-o", "--output", required=True, help="output .h5ad (input plus obsm/varm/uns results)")
    fit.add_argument("--config", metavar="TOML", default=None,
                     help="read options from a TOML file (keys as the long options, e.g. n_latent = 20); "
                     "options on the command line take precedence")  # fmt: skip
    data = fit.add_argument_group("data")
    data.add_argument("--layer", default=None, help="layer holding raw counts (default: X)")
    data.add_argument("--batch-key", default=None, help="obs column of batches (enters the decoder)")
    data.add_argument("--allow-non-integer", "--no-check-counts", dest="allow_non_integer", action="store_true",
                      help="accept non-integer values in the counts (default: refuse them, as log-normalized data)")  # fmt: skip
    data.add_argument("--labels-key", default=None, help="obs column of labels (needed for --dispersion gene-label)")
    data.add_argument("--categorical-covariate-keys", type=_keys, default=None, metavar="K1,K2",
                      help="comma-separated obs columns of categorical covariates (enter the decoder)")  # fmt: skip
    data.add_argument("--continuous-covariate-keys", type=_keys, default=None, metavar="K1,K2",
                      help="comma-separated numeric obs columns of continuous covariates")  # fmt: skip
    model = fit.add_argument_group("model")
    model.add_argument("--n-latent", type=_positive_int, default=10, help="number of factors (default 10)")
    model.add_argument("--n-hidden", type=_positive_int, default=128, help="encoder width (default 128)")
    model.add_argument("--n-layers", type=_positive_int, default=1, help="encoder depth (default 1)")
    model.add_argument("--dropout-rate", type=float, default=0.1, help="encoder dropout (default 0.1)")
    model.add_argument(
        "--gene-likelihood", choices=["nb", "zinb", "poisson", "normal"], default="nb", help="default nb"
    )
    model.add_argument("--dispersion", choices=["gene", "gene-batch", "gene-label", "gene-cell"], default="gene",
                       help="default gene")  # fmt: skip
    model.add_argument("--latent-distribution", choices=["normal", "ln"], default="normal", help="default normal")
    model.add_argument("--loadings-prior", choices=["normal", "laplace", "horseshoe", "ard"], default=None,
                       help="a prior on the loadings: Bayesian loadings with uncertainty; horseshoe and ard switch "
                       "unneeded factors off (default: none, point estimates as scvi-tools)")  # fmt: skip
    model.add_argument("--gene-programs", metavar="GMT_OR_VARM_KEY", default=None,
                       help="gene programs: a .gmt file or an adata.varm key holding an expiMap mask (names in "
                       "uns['terms']); one factor per program, with a program-informed horseshoe prior")  # fmt: skip
    model.add_argument("--n-unannotated", type=int, default=None, help="free factors beside the programs (default 0)")
    model.add_argument("--program-confidence", type=float, default=None,
                       help="how hard genes outside a program are shrunk, in [0, 1) (default 0.99)")  # fmt: skip
    model.add_argument("--min-genes", type=_positive_int, default=None,
                       help="drop programs with fewer genes in the data (default 5)")  # fmt: skip
    train = fit.add_argument_group("training")
    _add_training_options(train)
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    out = fit.add_argument_group("output")
    out.add_argument("--save-model", metavar="DIR", default=None, help="also save the fitted model to DIR")
    out.add_argument("--n-top-genes", type=int, default=5, help="genes per factor in the summary (default 5)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output file or model directory")

    from .cli_map import add_subcommand  # pyro-ldvae map

    fit.set_defaults(run=run_fit)
    add_subcommand(sub, sys.modules[__name__])
    transform = sub.add_parser(
        "transform",
        help="embed new cells with a saved model",
        description="Embed the cells of INPUT with the model saved in MODEL_DIR (pyro-ldvae fit --save-model or "
        "LinearSCVI.save); INPUT needs the model's genes (reordered if needed) and its obs keys.",
    )
    transform.add_argument("model_dir", metavar="MODEL_DIR", help="directory of a saved model")
    transform.add_argument("input", metavar="INPUT", help="input .h5ad with raw counts")
    transform.add_argument("-o", "--output", required=True, help="output .h5ad with obsm['X_ldvae'] and the loadings")
    transform.add_argument("--batch-size", type=_positive_int, default=1024, help="cells per pass (default 1024)")
    transform.add_argument("--accelerator", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
    transform.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    transform.set_defaults(run=run_transform)
    cli_info.add_parser(sub).set_defaults(run=cli_info.run_info)
    return parser


# ----------------------------------------------------------------------------------------
def _check_output(path: str, overwrite: bool, what: str = "output") -> None:
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{what} {path} exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"the directory of {what} {path} does not exist")


def _read_h5ad(path: str):
    import anndata

    if not os.path.exists(path):
        raise UserError(f"input {path} does not exist")
    try:
        return anndata.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise many types for unreadable files
        raise UserError(f"cannot read {path} as .h5ad ({type(err).__name__}: {err})") from err


def _write_h5ad_atomic(adata, path: str) -> None:
    """Write to a temporary file in the target's directory, then rename: never a partial file."""
    from .io import write_h5ad

    directory = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp.h5ad", dir=directory)
    os.close(handle)
    try:
        write_h5ad(adata, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _summary(model, adata, elapsed: float, n_top: int) -> None:
    history = model.history
    epochs = len(history["elbo_train"]) if "elbo_train" in history else 0
    print(f"pyro-ldvae: {adata.n_obs} cells x {adata.n_vars} genes, {epochs} epochs in {elapsed:.1f} s")
    line = f"final negative ELBO per cell: train {history['elbo_train'].iloc[-1, 0]:.2f}" if epochs else ""
    if "elbo_validation" in history and history["elbo_validation"].notna().any().item():
        line += f", validation {history['elbo_validation'].dropna().iloc[-1, 0]:.2f}"
    if line:
        print(line)
    variance = model.get_factor_variance_explained(sort=True)
    loadings = model.get_loadings()
    print(f"factors by variance explained in the decoder logits (top {n_top} genes, + and -):")
    for name, row in variance.iterrows():
        ordered = loadings[name].sort_values()
        plus = ", ".join(ordered.index[::-1][:n_top])
        minus = ", ".join(ordered.index[:n_top])
        print(f"  {name} ({100 * row['fraction']:.1f}%): + {plus} | - {minus}")


def _program_options(args: argparse.Namespace) -> dict:
    """``LinearSCVI``'s gene-program arguments given on the command line (none without --gene-programs)."""
    names = ("gene_programs", "n_unannotated", "program_confidence", "min_genes")
    given = {name: getattr(args, name, None) for name in names if getattr(args, name, None) is not None}
    if given and "gene_programs" not in given:
        raise UserError(f"--{'/--'.join(n.replace('_', '-') for n in given)} need --gene-programs.")
    return given


def run_fit(args: argparse.Namespace) -> int:
    """Run ``pyro-ldvae fit``: read the data, train, write the results; returns the exit status."""
    from ..infer.distributed import init_from_env, is_main_process
    from ..infer.options import TrainOptions
    from . import datasets
    from .linear_scvi import LinearSCVI

    init_from_env(args.accelerator)  # under torchrun: join the process group (DDP training)
    _check_output(args.output, args.overwrite)
    if args.save_model:
        _check_output(args.save_model, args.overwrite, "model directory")
    adata = _read_h5ad(args.input) if args.input else datasets.pbmc68k_counts()
    LinearSCVI.setup_anndata(  # validates the counts (validate.py) before any training time is spent
        adata,
        layer=args.layer,
        batch_key=args.batch_key,
        labels_key=args.labels_key,
        categorical_covariate_keys=args.categorical_covariate_keys,
        continuous_covariate_keys=args.continuous_covariate_keys,
        check_counts=not args.allow_non_integer,
    )
    model = LinearSCVI(
        adata,
        n_hidden=args.n_hidden,
        n_latent=args.n_latent,
        n_layers=args.n_layers,
        dropout_rate=args.dropout_rate,
        dispersion=args.dispersion,
        gene_likelihood=args.gene_likelihood,
        latent_distribution=args.latent_distribution,
        loadings_prior=args.loadings_prior,
        seed=args.seed,
        **_program_options(args),
    )
    start = time.perf_counter()
    model.train(
        **{name: getattr(args, name) for name in TrainOptions.names() if hasattr(args, name)},
        plan_kwargs={"lr": args.lr},
        progress_bar=sys.stderr.isatty(),
    )
    elapsed = time.perf_counter() - start
    interrupted = getattr(model, "stop_reason_", "completed") == "interrupted"
    if interrupted:
        n_done = len(model.history.get("elbo_train", ()))
        if n_done == 0:
            raise KeyboardInterrupt
        print(f"pyro-ldvae: interrupted; writing the results of the {n_done} completed epoch(s)", file=sys.stderr)
    if not is_main_process():
        return 0  # under torchrun only rank 0 writes results
    model.to_adata(adata)
    if args.save_model:
        model.save(args.save_model, overwrite=args.overwrite)
    _write_h5ad_atomic(adata, args.output)
    _summary(model, adata, elapsed, args.n_top_genes)
    if args.save_model:
        print(f"saved model to {args.save_model}")
    print(f"wrote {args.output}")
    return 130 if interrupted else 0


def run_transform(args: argparse.Namespace) -> None:
    """Run ``pyro-ldvae transform``: embed new cells with a saved model and write them."""
    from .linear_scvi import LinearSCVI

    _check_output(args.output, args.overwrite)
    if not os.path.isdir(args.model_dir):
        raise UserError(f"model directory {args.model_dir} does not exist")
    adata = _read_h5ad(args.input)
    if adata.n_obs == 0:
        raise UserError(f"{args.input} has no cells")
    model = LinearSCVI.load(args.model_dir, adata=adata, accelerator=args.accelerator)
    start = time.perf_counter()
    result = model.adata  # the input, or a copy with the model's genes in its order
    model.to_adata(result)
    _write_h5ad_atomic(result, args.output)
    print(f"pyro-ldvae: embedded {result.n_obs} cells x {result.n_vars} genes in {time.perf_counter() - start:.1f} s")
    print(f"wrote {args.output}")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"pyro-ldvae: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _with_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None):
    """``args`` re-parsed with the TOML file's values as defaults, so the command line still wins."""
    fit = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["fit"]
    try:
        import tomllib
    except ImportError:  # Python 3.10
        fit.error("--config needs Python 3.11 or later (tomllib)")
    try:
        with open(args.config, "rb") as handle:
            config = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as err:
        fit.error(f"--config {args.config}: {err}")
    known = {action.dest for action in fit._actions} - {"help", "config"}
    values = {key.replace("-", "_"): value for key, value in config.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        fit.error(f"--config {args.config}: unknown option(s) {unknown}; the options are {sorted(known)}")
    fit.set_defaults(**values)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pyro-ldvae`` console script; returns the exit status."""
    import warnings

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "config", None):
            args = _with_config(parser, args, argv)
    except SystemExit as exit_:  # --help, --version, or a bad argument (already reported in one line)
        return int(exit_.code or 0)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            return args.run(args) or 0  # each subcommand sets its run function
        except (UserError, ValueError, OSError, FloatingPointError) as err:
            message = " ".join(str(err).split())  # one line
            print(f"pyro-ldvae: error: {message}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("pyro-ldvae: interrupted; nothing written", file=sys.stderr)
            return 130
