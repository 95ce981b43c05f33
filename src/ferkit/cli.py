"""The `ferkit` command: a thin layer over the Python API. Nothing else reads sys.argv."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from ferkit import __version__
from ferkit.config import AUGMENTATIONS, CLASS_WEIGHTS, LR_SCHEDULES, OPTIMIZERS, PRECISIONS
from ferkit.errors import FerkitError

log = logging.getLogger("ferkit")


class _Cli(click.Group):
    """Turns FerkitError (and anything unexpected) into one line on stderr and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except FerkitError as err:
            if _debug(ctx):
                raise
            click.echo(f"error: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as err:  # a bug or an unforeseen failure: still one line unless --debug
            if _debug(ctx):
                raise
            click.echo(f"error: {type(err).__name__}: {err} (run with --debug for the traceback)", err=True)
            ctx.exit(1)


def _debug(ctx) -> bool:
    return bool(ctx.find_root().params.get("debug"))


@click.group(cls=_Cli)
@click.version_option(__version__, prog_name="ferkit")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool):
    """Facial expression recognition: predict, train, evaluate."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


# --- models -------------------------------------------------------------------------------------


@cli.group("models", invoke_without_command=True)
@click.pass_context
def models_cmd(ctx):
    """List the registered models; `models show NAME` prints one's layers."""
    if not ctx.invoked_subcommand:
        ctx.invoke(models_list)


@models_cmd.command("list")
@click.argument("pattern", required=False, default="*")
def models_list(pattern: str):
    """List the registered models (optionally matching a PATTERN such as 'seed-*')."""
    from ferkit.models import get_model_spec, list_models

    names = list_models(pattern)
    if not names:
        raise FerkitError(f"no model matches {pattern!r}")
    rows = [(n, get_model_spec(n)) for n in names]
    _print_table(
        ["model", "input", "description"],
        [[n, f"{s.input_size[0]}x{s.input_size[1]}x{s.channels}", s.description] for n, s in rows],
        right=(),
    )


@models_cmd.command("show")
@click.argument("name")
def models_show(name: str):
    """Print the layer table of model NAME: layers, output shapes and parameter counts."""
    from ferkit.models import create_model

    model = create_model(name)
    rows = [[layer.name, type(layer).__name__, str(_output_shape(layer)), f"{layer.count_params():,}"] for layer in model.layers]
    _print_table(["layer", "type", "output shape", "params"], rows, right=(3,), title=f"{name}: {model.count_params():,} parameters")


def _output_shape(layer):
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):
        return "?"


# --- train --------------------------------------------------------------------------------------


@cli.command("train")
@click.option("--model", help="Model name from `ferkit models` (default seed-cnn).")
@click.option("--data", help="Training data: a class-folder tree or a FER2013 CSV (its Training rows).")
@click.option("--val", help="Validation data (a CSV gives its PublicTest rows). Default: split off --val-split.")
@click.option("--val-split", type=float, help="Fraction of --data held out when --val is absent (default 0.1).")
@click.option("--classes", help="Comma-separated class list, to keep classes beyond the seven emotions.")
@click.option("--epochs", type=int, help="Epochs to train in all (default 30); with --resume, the new total.")
@click.option("--batch-size", type=int, help="Batch size (default 64).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), help="Optimizer (default adam).")
@click.option("--lr", "learning_rate", type=float, help="Learning rate (default 1e-3).")
@click.option("--weight-decay", type=float, help="Decoupled weight decay for adamw and sgd (default 0).")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), help="constant (default), plateau or cosine.")
@click.option("--lr-patience", type=int, help="Epochs without a val gain before plateau halves the rate (default 5).")
@click.option("--label-smoothing", type=float, help="Label smoothing (default 0).")
@click.option("--class-weight", type=click.Choice(CLASS_WEIGHTS), help="Loss weights per class: none (default), balanced, sqrt.")
@click.option("--augment", help=f"Comma-separated augmentations: {', '.join(AUGMENTATIONS)}.")
@click.option("--precision", type=click.Choice(PRECISIONS), help="float32 (default) or mixed_bfloat16 (faster on CPUs with bf16).")
@click.option("--seed", type=int, help="Random seed (default 0).")
@click.option("--out", type=click.Path(path_type=Path), help="Run folder (default runs/train).")
@click.option("--resume", type=click.Path(path_type=Path), help="Continue the run in this folder where it stopped.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder at --out.")
def train_cmd(resume: Path | None, overwrite: bool, **flags):
    """Train a model and record everything in a run folder."""
    from ferkit.config import TrainConfig

    flags = {k: v for k, v in flags.items() if v is not None}
    for key in ("classes", "augment"):
        if key in flags:
            flags[key] = [item.strip() for item in flags[key].split(",") if item.strip()]
    if resume:
        if set(flags) - {"epochs"}:
            raise FerkitError("with --resume only --epochs may change; the rest comes from the run's config.json")
        config = TrainConfig.load(resume / "config.json") if (resume / "config.json").exists() else None
        if config is None:
            raise FerkitError(f"cannot resume: {resume} is not a ferkit run folder (no config.json)")
        config.epochs = flags.get("epochs", config.epochs)
        config.out = str(resume)
    else:
        if "out" in flags:
            flags["out"] = str(flags["out"])
        config = TrainConfig(**flags)

    from ferkit.runs import RunState
    from ferkit.train import train

    run = train(config, resume=resume is not None, overwrite=overwrite, verbose=1 if sys.stdout.isatty() else 2)
    state = RunState.load(run)
    click.echo(
        f"done: {state.epochs_done} epochs, best val accuracy {state.best_val_accuracy:.4f} at epoch "
        f"{state.best_epoch}; run folder {run} (best.keras, history.csv, curves.png)"
    )


# --- evaluate -----------------------------------------------------------------------------------


@cli.command("evaluate")
@click.argument("model")
@click.option("--data", required=True, help="A class-folder tree or a FER2013 CSV.")
@click.option("--usage", default="PublicTest", show_default=True, help="CSV rows to use: Training, PublicTest or PrivateTest.")
@click.option("--out", type=click.Path(path_type=Path), help="Folder for the report files (default: beside the model).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON on stdout.")
def evaluate_cmd(model: str, data: str, usage: str, out: Path | None, batch_size: int, as_json: bool):
    """Score MODEL (a run folder or model file) on labelled data; write JSON, CSV and PNG reports."""
    from ferkit.data import load_dataset
    from ferkit.evaluate import evaluate
    from ferkit.runtime import load_classifier, resolve_model_path

    classifier = load_classifier(model)
    dataset = load_dataset(
        data, classes=classifier.classes, image_size=classifier.input_size, usage=usage, progress=not as_json
    )
    report = evaluate(classifier, dataset, batch_size=batch_size)
    folder = out or _default_eval_folder(resolve_model_path(model), Path(model), Path(data), usage)
    written = report.save(folder)
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "files": [str(p) for p in written]}, indent=2))
        return
    _print_report(report)
    click.echo(f"wrote {', '.join(p.name for p in written)} to {folder}")


def _default_eval_folder(model_path: Path, given: Path, data: Path, usage: str) -> Path:
    name = data.name if data.is_dir() else f"{data.stem}-{usage}"
    if given.is_dir():
        return given / f"eval-{name}"
    return model_path.parent / f"eval-{model_path.stem}-{name}"


def _print_report(report) -> None:
    rows = [
        [name, f"{s.precision:.3f}", f"{s.recall:.3f}", f"{s.f1:.3f}", str(s.support)]
        for name, s in report.per_class.items()
    ]
    title = f"{report.model} on {report.data}: accuracy {report.accuracy:.4f}, macro-F1 {report.macro_f1:.4f} ({len(report.y_true)} faces)"
    _print_table(["class", "precision", "recall", "f1", "support"], rows, title=title)
    short = [c[:8] for c in report.classes]
    matrix_rows = [[name, *map(str, row)] for name, row in zip(short, report.confusion_matrix)]
    _print_table(["true \\ predicted", *short], matrix_rows, title="confusion matrix (counts)")


# --- export -------------------------------------------------------------------------------------


@cli.command("export")
@click.argument("model")
@click.option("--onnx", "to_onnx", is_flag=True, required=True, help="Export to ONNX (the only format so far).")
@click.option("--out", type=click.Path(path_type=Path), help="Output file (default: beside the model, .onnx).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def export_cmd(model: str, to_onnx: bool, out: Path | None, overwrite: bool):
    """Export MODEL (a run folder or .keras file) to ONNX, checked to agree with Keras."""
    from ferkit.export import TOLERANCE, export_onnx

    if not to_onnx:
        raise FerkitError("choose an export format: --onnx")
    path = export_onnx(model, out, overwrite=overwrite)
    click.echo(f"wrote {path} (probabilities agree with Keras within {TOLERANCE})")


# --- predict ------------------------------------------------------------------------------------


@cli.command("predict")
@click.argument("images", nargs=-1, required=True)
@click.option("--model", required=True, help="A run folder or model file.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON (one object per line for several images).")
def predict_cmd(images: tuple[str, ...], model: str, as_json: bool):
    """Predict the emotion of the face in each IMAGE (a photo of one face, any size and format)."""
    from ferkit.predict import predict_image
    from ferkit.runtime import load_classifier

    classifier = load_classifier(model)
    failures = 0
    for image in images:
        if "://" in image:
            click.echo(f"error: {image}: URLs are not fetched (ferkit works offline); download the file first", err=True)
            failures += 1
            continue
        try:
            result = predict_image(image, model=classifier)
        except FerkitError as err:
            click.echo(f"error: {err}", err=True)
            failures += 1
            continue
        if as_json:
            click.echo(json.dumps(result.to_dict(), indent=None if len(images) > 1 else 2))
        else:
            _print_prediction(result)
    if failures:
        sys.exit(1)


def _print_prediction(result) -> None:
    for face in result.faces:
        click.echo(f"{result.source}: {face.emotion} ({face.score:.1%})")
        for name, p in face.probabilities.items():
            click.echo(f"  {name:<9} {p:6.1%} {'█' * round(p * 30)}")


# --- helpers ------------------------------------------------------------------------------------


def _print_table(columns, rows, *, title: str | None = None, right=None) -> None:
    """A rich table; columns after the first are right-aligned unless `right` names the ones that are."""
    from rich.console import Console
    from rich.table import Table

    right = range(1, len(columns)) if right is None else right
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="right" if i in right else "left")
    for row in rows:
        table.add_row(*row)
    Console(soft_wrap=True).print(table)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="ferkit")


if __name__ == "__main__":
    main()
