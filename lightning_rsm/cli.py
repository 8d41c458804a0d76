"""Command line: ``lightning-rsm compute``, ``compare``, ``report`` and ``demo``.

Only parses arguments and reports; the work is done by :mod:`lightning_rsm.functional`,
:mod:`lightning_rsm.run_comparison`, :mod:`lightning_rsm.report` and :mod:`lightning_rsm.demo`.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lightning_rsm.functional.options import (
    COMPARISON_METHODS,
    DEFAULT_MAX_POSITIONS,
    KERNELS,
    MATCHERS,
)

_RESERVED = ("labels", "logits")
_KINDS = ("semantic", "baseline")
# The scores shown in the table, and their column headers.
_COLUMNS = {"map": "mAP", "precision@1": "P@1", "probability_agreement": "prob. agreement"}
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _one_line(error: BaseException) -> str:
    """The first sentence of an error message's first line, without terminal colour codes."""
    text = _ANSI_ESCAPE.sub("", str(error)).strip()
    if not text:
        return type(error).__name__
    line = text.splitlines()[0].strip()
    return line.split(". ", 1)[0].rstrip(".")


class _CliError(Exception):
    """A problem with the user's input, reported in one line without a traceback."""


def _load_features(path: Path) -> tuple[dict[str, Tensor], Tensor | None, Tensor | None]:
    """Read representations saved with ``torch.save``, with ``weights_only=True``.

    The file holds a tensor (one layer, named ``features``) or a dict of layer name -> tensor
    with optional ``labels`` ``(N,)`` and ``logits`` ``(N, K)`` entries.

    Args:
        path: the file.

    Returns:
        ``(layers, labels, logits)``; labels and logits are ``None`` when absent.

    Raises:
        _CliError: If the file cannot be read or holds something else.
    """
    if not path.is_file():
        raise _CliError(f"Expected FEATURES to be a file, but got {str(path)!r} (not found).")
    try:
        with warnings.catch_warnings():  # torch warns on stderr about foreign pickles
            warnings.simplefilter("ignore")
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise _CliError(
            f"Expected {str(path)!r} to be a file written by torch.save holding tensors, "
            f"but it could not be loaded ({type(error).__name__}: {_one_line(error)})."
        ) from None
    if isinstance(content, Tensor):
        content = {"features": content}
    if not isinstance(content, dict) or not content:
        raise _CliError(
            f"Expected {str(path)!r} to hold a tensor or a dict of layer name -> tensor, "
            f"but got {type(content).__name__}."
        )
    bad = [str(k) for k, v in content.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise _CliError(
            f"Expected every entry of {str(path)!r} to map a str name to a tensor, "
            f"but got non-tensor entries {bad}."
        )
    labels = content.pop("labels", None)
    logits = content.pop("logits", None)
    if not content:
        raise _CliError(
            f"Expected {str(path)!r} to hold at least one layer besides {list(_RESERVED)}, "
            "but got none."
        )
    return content, labels, logits


def _compute(args: argparse.Namespace) -> None:
    from lightning_rsm.functional import rsm_scores, semantic_rsm, spatio_semantic_rsm, to_concepts

    layers, labels, logits = _load_features(args.features)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    out: Path = args.output
    rsms: dict[str, Tensor] = {}
    rows = []
    for layer, x in layers.items():
        try:
            concepts = to_concepts(x, max_positions=args.max_positions, name=layer)
            kinds = {
                "semantic": semantic_rsm(
                    concepts, kernel=args.kernel, matcher=args.matcher, progress=progress
                )
            }
            if not args.no_baseline:
                kinds["baseline"] = spatio_semantic_rsm(concepts, kernel=args.kernel)
            for kind, rsm in kinds.items():
                rsms[f"{layer}/{kind}"] = rsm
                rows.append((layer, kind, rsm_scores(rsm, labels, logits)))
        except (TypeError, ValueError) as error:
            raise _CliError(f"layer {layer!r}: {_one_line(error)}") from None
    png = out.with_suffix(".png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(rsms, out)
        _save_heatmaps(rsms, labels, args.kernel, png)
    except OSError as error:
        raise _CliError(f"Expected OUT to be a writable file path, but got {error}") from None
    print(_table(rows))
    print(f"\nwrote {out} ({len(rsms)} RSMs) and {png}")


def _table(rows: Sequence[tuple[str, str, dict[str, Tensor]]]) -> str:
    header = ["layer", "rsm", *_COLUMNS.values()]
    cells = [
        [layer, kind, *(f"{float(s[key]):.3f}" if key in s else "-" for key in _COLUMNS)]
        for layer, kind, s in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        # names left-aligned, numbers right-aligned
        pairs = enumerate(zip(values, widths, strict=True))
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in pairs)

    return "\n".join(line(values) for values in [header, *cells])


def _save_heatmaps(rsms: dict[str, Tensor], labels: Tensor | None, kernel: str, png: Path) -> None:
    from matplotlib.figure import Figure

    from lightning_rsm.plotting import figure_to_png, heatmap_figure

    layers = list(dict.fromkeys(name.rsplit("/", 1)[0] for name in rsms))
    kinds = [k for k in _KINDS if any(name.endswith(f"/{k}") for name in rsms)]
    fig = Figure(figsize=(3.6 * len(kinds) + 1.2, 4.2 * len(layers)), dpi=100, layout="constrained")
    for layer, part in zip(
        layers, fig.subfigures(len(layers), 1, squeeze=False)[:, 0], strict=True
    ):
        kind_rsms = {kind: rsms[f"{layer}/{kind}"] for kind in kinds}
        heatmap_figure(kind_rsms, labels, layer=layer, kernel=kernel, figure=part)
    png.write_bytes(figure_to_png(fig))


def _compare(args: argparse.Namespace) -> None:
    from lightning_rsm.run_comparison import compare_runs, comparison_figure, run_name

    names = args.names or [run_name(args.run_a), run_name(args.run_b)]
    if names[0] == names[1]:
        names = [str(args.run_a), str(args.run_b)]
    try:
        result = compare_runs(
            args.run_a,
            args.run_b,
            evaluation=args.evaluation,
            step=args.step,
            method=args.method,
            kind=args.kind,
        )
    except ValueError as error:  # ProbeMismatchError included
        raise _CliError(str(error)) from None
    print(result.table(*names))
    if args.output is not None:
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            comparison_figure(result, *names).savefig(args.output, dpi=100)
        except OSError as error:
            raise _CliError(f"Expected -o to be a writable file path, but got {error}") from None
        print(f"\nwrote {args.output}")


def _report(args: argparse.Namespace) -> None:
    from lightning_rsm.report import write_report

    try:
        written = write_report(
            args.run_dir, args.output, evaluation=args.evaluation, step=args.step
        )
    except ValueError as error:
        raise _CliError(str(error)) from None
    except OSError as error:
        raise _CliError(f"Expected -o to be a writable folder, but got {error}") from None
    print(f"wrote {len(written)} files to {args.output}")


def _add_evaluation_choice(parser: argparse.ArgumentParser) -> None:
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--evaluation",
        type=int,
        default=-1,
        help="which archived evaluation, an index in step order (default: -1, the last)",
    )
    choice.add_argument("--step", type=int, default=None, help="the evaluation of this step")


def _demo(args: argparse.Namespace) -> None:
    from lightning_rsm.demo import run_demo

    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise _CliError(
            "Expected scikit-learn to be installed for the demo's data, but it is not: "
            "pip install 'lightning-rsm[demo]'."
        ) from None
    run_demo(
        log_dir=args.log_dir,
        epochs=args.epochs,
        per_class=args.per_class,
        train_size=args.train_size,
        seed=args.seed,
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, but got {text!r}")
    return value


def _max_positions(text: str) -> int | None:
    return None if text.lower() == "none" else _positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-rsm`` argument parser with its ``compute``, ``compare``, ``report`` and
    ``demo`` commands.

    Returns:
        the parser; ``parse_args`` sets ``command`` and ``run`` (the command's function).

    Example:
        >>> build_parser().parse_args(["demo", "--epochs", "2"]).epochs
        2
    """
    parser = argparse.ArgumentParser(
        prog="lightning-rsm",
        description="Semantic (permutation-invariant) representational similarity matrices.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compute = commands.add_parser(
        "compute",
        help="RSMs and their quality for representations saved with torch.save",
        description=(
            "Compute semantic (and baseline) RSMs of representations saved with torch.save: a "
            "tensor (N, C, H, W), (N, T, D) or (N, D), or a dict of layer name -> tensor with "
            "optional 'labels' (N,) and 'logits' (N, K) entries. Prints retrieval mAP, "
            "precision@1 (with labels) and probability agreement (with logits), writes the "
            "RSMs to OUT (a dict '<layer>/<kind>' -> (N, N) tensor) and heatmaps to OUT "
            "with the suffix .png."
        ),
    )
    compute.add_argument("features", type=Path, metavar="FEATURES", help="file from torch.save")
    compute.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="OUT",
        help="output file for the RSMs, e.g. rsms.pt",
    )
    compute.add_argument(
        "--kernel", default="cosine", choices=sorted(KERNELS), help="RSM kernel (default: cosine)"
    )
    compute.add_argument(
        "--matcher", default="exact", choices=sorted(MATCHERS), help="LAP solver (default: exact)"
    )
    compute.add_argument(
        "--max-positions",
        type=_max_positions,
        default=DEFAULT_MAX_POSITIONS,
        help=(
            "average-pool feature maps to at most this many positions; 'none' keeps all (exact "
            "costs about S^3 per pair) (default: %(default)s)"
        ),
    )
    compute.add_argument(
        "--no-baseline", action="store_true", help="skip the spatially aligned baseline RSM"
    )
    compute.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    compute.set_defaults(run=_compute)

    compare = commands.add_parser(
        "compare",
        help="layer x layer RSA of two runs' RSM archives",
        description=(
            "Compare every layer of run A with every layer of run B on the same probe: the "
            "RSA of their archived RSMs (RSMMonitor(save_rsms=True)). RUN is a run's log dir or "
            "its rsms folder. Prints the matrix; -o draws it. Archives of different probes are "
            "an error (exit status 2)."
        ),
    )
    compare.add_argument("run_a", type=Path, metavar="RUN_A", help="log dir or rsms folder")
    compare.add_argument("run_b", type=Path, metavar="RUN_B", help="log dir or rsms folder")
    compare.add_argument("-o", "--output", type=Path, default=None, help="heatmap file, e.g. a.png")
    compare.add_argument(
        "--method",
        default="spearman",
        choices=sorted(COMPARISON_METHODS),
        help="RSA method (default: spearman)",
    )
    compare.add_argument(
        "--kind",
        default="semantic",
        choices=_KINDS,
        help="which RSMs to compare (default: semantic)",
    )
    compare.add_argument(
        "--names", nargs=2, metavar=("NAME_A", "NAME_B"), help="run names for the axes"
    )
    _add_evaluation_choice(compare)
    compare.set_defaults(run=_compare)

    report = commands.add_parser(
        "report",
        help="draw a run's archived RSMs and scores into a folder",
        description=(
            "From a run's RSM archive, offline: scores.csv and trajectories.png (every score of "
            "every archived evaluation), the heatmaps of one evaluation and its layer x layer "
            "RSA, as RSMMonitor logs them."
        ),
    )
    report.add_argument("run_dir", type=Path, metavar="RUN", help="log dir or rsms folder")
    report.add_argument(
        "-o", "--output", type=Path, required=True, metavar="FOLDER", help="output folder"
    )
    _add_evaluation_choice(report)
    report.set_defaults(run=_report)

    demo = commands.add_parser(
        "demo",
        help="train a small CNN on shifted digits with RSMMonitor",
        description=(
            "Train a small CNN on scikit-learn's digits, shifted on a larger canvas, with "
            "RSMMonitor on three conv blocks; print semantic vs baseline retrieval mAP and "
            "probability agreement per epoch and layer; write TensorBoard logs."
        ),
    )
    demo.add_argument("--log-dir", default="runs/demo", help="TensorBoard log folder")
    demo.add_argument("--epochs", type=_positive_int, default=3)
    demo.add_argument("--per-class", type=_positive_int, default=12, help="probe images per class")
    demo.add_argument(
        "--train-size",
        type=_positive_int,
        default=None,
        help="train on only this many images (default: all but the probe)",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv``.

    Returns:
        the exit status: 0 on success, 2 on bad input (with a one-line error on stderr).

    Example:
        >>> main(["compute", "no-such-file.pt", "-o", "rsms.pt"])
        2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except _CliError as error:
        print(f"lightning-rsm {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
