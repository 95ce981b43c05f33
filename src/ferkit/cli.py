"""The `ferkit` command: a thin layer over the Python API. Nothing else reads sys.argv."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import sys
import threading
import traceback
import warnings
from dataclasses import MISSING, fields, replace
from pathlib import Path

import click

from ferkit import __version__
from ferkit.config import TrainConfig, option_flag
from ferkit.errors import FerkitError, Terminated, on_one_line
from ferkit.faces import CROPPED_FACE_SIDE, DETECTORS
from ferkit.predict import UNCERTAIN_BELOW
from ferkit.progress import LineHandler
from ferkit.ray_predict import SHARD_IMAGES, RayPredictConfig
from ferkit.runtime import TTA_CHOICES
from ferkit.study import ENTRIES as STUDY_ENTRIES
from ferkit.study import TRANSFER_MODEL as STUDY_TRANSFER_MODEL

log = logging.getLogger("ferkit")

TTA_OPTION = click.option(
    "--tta", type=click.Choice(TTA_CHOICES),
    help="Test-time augmentation: 'flip' averages each face with its mirror image (default: what the model file says).",
)



class PositiveNumber(click.ParamType):
    """A finite number above 0 (click's FloatRange lets NaN and infinity through)."""

    name = "float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not (math.isfinite(number) and number > 0):
            self.fail(f"{value!r} is not a positive number", param, ctx)
        return number


POSITIVE = PositiveNumber()


class OutputPath(click.Path):
    """A path to write to: never empty (an empty --out would write into the current folder)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; give a folder or file to write", param, ctx)
        return super().convert(value, param, ctx)


OUTPUT_PATH = OutputPath(path_type=Path)


# Exit codes: 0 done; 1 done, but some items of a batch failed (each was reported); 2 a problem with the
# input or options (one line says which); 3 ferkit failed unexpectedly (a bug: please report it);
# 130 interrupted; 141 the output pipe was closed; 143 stopped by SIGTERM.
EXIT_INTERNAL_ERROR = 3
EXIT_BROKEN_PIPE = 141  # what a shell reports for a command ended by SIGPIPE
EXIT_TERMINATED = 143  # as a shell reports a command ended by SIGTERM


class _Cli(click.Group):
    """Turns FerkitError (and anything unexpected) into one line on stderr and an exit code."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as err:  # `ferkit --bogus`: one line too
            _say_usage_error(err)
            sys.exit(err.exit_code)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as err:  # one line, as every other error, instead of usage + hint + error
            _traceback_if_debug(ctx)
            _say_usage_error(err)
            ctx.exit(err.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except FerkitError as err:
            _traceback_if_debug(ctx)
            # an interruption the user asked for is said as it is, not as an error
            click.echo(str(err) if err.exit_code == 130 else on_one_line(f"error: {err}"), err=True)
            ctx.exit(err.exit_code)
        except Terminated:
            click.echo("terminated", err=True)
            ctx.exit(EXIT_TERMINATED)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # the reader went away (`ferkit models | head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
            ctx.exit(EXIT_BROKEN_PIPE)
        except OSError as err:
            if err.filename is None:
                _report_unexpected(ctx, err)
            _traceback_if_debug(ctx)
            # a path the user named cannot be used as asked: missing, a file where a folder must go, not
            # writable, a name too long, a full disk
            click.echo(f"error: {err.filename}: {err.strerror}", err=True)
            ctx.exit(2)
        except Exception as err:
            _report_unexpected(ctx, err)


def _say_usage_error(err: click.UsageError) -> None:
    where = err.ctx.command_path if err.ctx else "ferkit"
    if isinstance(err, click.NoSuchOption) and err.option_name == "--debug" and where != "ferkit":
        click.echo(f"error: --debug goes before the command: ferkit --debug {where.split(' ', 1)[-1]} ...", err=True)
    else:
        click.echo(f"error: {err.format_message()} (see: {where} --help)", err=True)


def _report_unexpected(ctx, err: Exception) -> None:
    """A bug or an unforeseen failure: still one line, after the traceback with --debug."""
    _traceback_if_debug(ctx)
    first = (str(err).strip().splitlines() or [""])[0]
    click.echo(f"internal error: {type(err).__name__}: {first} (run `ferkit --debug ...` for the traceback)", err=True)
    ctx.exit(EXIT_INTERNAL_ERROR)


def _traceback_if_debug(ctx) -> None:
    """With --debug, the traceback of the error being handled, before its one line: the exit code stays
    the one it would be without --debug, so that scripts read it the same."""
    if _debug(ctx):
        traceback.print_exc()


def _debug(ctx) -> bool:
    return bool(ctx.find_root().params.get("debug"))


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ferkit")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool):
    """Facial expression recognition: predict, train, evaluate."""
    handler = LineHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    if not debug:  # a library's warning (Pillow's "Corrupt EXIF data") in one line, not with its source line
        warnings.showwarning = lambda message, category, *_, **__: log.warning("%s", message)
    _stop_cleanly_on_sigterm()
    hook = sys.unraisablehook
    already = isinstance(hook, functools.partial) and hook.func is redeliver_interrupt
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler and hasattr(signal, "setitimer") and not already:
        sys.unraisablehook = functools.partial(redeliver_interrupt, previous=hook)


def _stop_cleanly_on_sigterm() -> None:
    """`kill`, or a closed terminal (SIGHUP), stops a command as Ctrl-C does, with its clean-up (partial files
    removed, a summary written) and one line; the default handlers come back when the command ends."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGHUP"):  # no SIGHUP on Windows
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is signal.SIG_DFL:
            signal.signal(number, _raise_terminated)
            click.get_current_context().call_on_close(functools.partial(signal.signal, number, signal.SIG_DFL))


def _raise_terminated(signum, frame):
    raise Terminated


def redeliver_interrupt(unraisable, *, previous) -> None:
    """A Ctrl-C whose KeyboardInterrupt Python dropped, raised where nothing could catch it (inside a
    garbage-collection callback, as JAX registers one, or a weakref callback run by a collection), comes
    again a moment later, so the command stops instead of running on to the end. Other exceptions go on
    to the `previous` hook (an `sys.unraisablehook`)."""
    if not (isinstance(unraisable.exc_type, type) and issubclass(unraisable.exc_type, KeyboardInterrupt)):
        previous(unraisable)
        return
    signal.signal(signal.SIGALRM, functools.partial(_raise_again, unraisable.exc_type))  # Terminated stays Terminated
    signal.setitimer(signal.ITIMER_REAL, 0.05)


def _raise_again(interrupt: type[KeyboardInterrupt], signum, frame):
    raise interrupt


# --- models -------------------------------------------------------------------------------------


class _ModelsGroup(click.Group):
    """`ferkit models PATTERN` is `ferkit models list PATTERN`."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "list", self.commands["list"], args
        return super().resolve_command(ctx, args)


@cli.group("models", cls=_ModelsGroup, invoke_without_command=True,
           short_help="List the shipped models and trainable networks; show a network's layers.")
@click.pass_context
def models_cmd(ctx):
    """List the models shipped with ferkit and the networks it can train (`models PATTERN`: those
    matching PATTERN, such as 'seed-*'); `models show NAME` prints a network's layers."""
    if not ctx.invoked_subcommand:
        ctx.invoke(models_list)


@models_cmd.command("list")
@click.argument("pattern", required=False, default="*")
def models_list(pattern: str):
    """List the shipped models and the registered networks (optionally those matching a PATTERN such
    as 'seed-*')."""
    from fnmatch import fnmatch

    from ferkit.models import get_model_spec, list_models
    from ferkit.runtime import shipped_models

    shipped = {name: entry for name, entry in shipped_models().items() if fnmatch(name, pattern)}
    names = list_models(pattern)
    if not shipped and not names:
        raise FerkitError(f"no model matches {pattern!r}")
    if shipped:
        # a tta column of "none" only would say nothing, and fold the names at 80 columns
        tta = any(entry["tta"] != "none" for entry in shipped.values())
        columns = ["shipped model", "network", "val acc", *(["tta"] if tta else []), "faces/s", "ms/face"]
        rows = [_shipped_row(name, entry, tta=tta) for name, entry in shipped.items()]
        _print_table(columns, rows, right=range(2, len(columns)),
                     title="Shipped with ferkit (--model NAME; the first is the default)")
        machines = sorted({entry["speed"]["machine"] for entry in shipped.values() if "speed" in entry})
        if machines:
            click.echo("faces/s in batches of 256, ms for one face alone, measured on")
            for machine in machines:
                click.echo(f"  {machine}")
            click.echo("int8 models run 2-3 times slower on CPUs without VNNI (docs/model-card.md)")
    if names:
        rows = [(n, get_model_spec(n)) for n in names]
        _print_table(
            ["network", "input", "description"],
            [[n, f"{s.input_size[0]}x{s.input_size[1]}x{s.channels}", s.description] for n, s in rows],
            right=(), title="Networks to train (ferkit train --model NAME)",
        )


def _shipped_row(name: str, entry: dict, *, tta: bool) -> list[str]:
    accuracy, speed = entry.get("val_accuracy"), entry.get("speed")
    return [name, entry["model"], f"{accuracy:.1%}" if accuracy is not None else "-",
            *([entry["tta"]] if tta else []),
            f"{speed['faces_per_second']:,}" if speed else "-", f"{speed['ms_per_face']:.2f}" if speed else "-"]


@models_cmd.command("show")
@click.argument("name")
def models_show(name: str):
    """Print the layer table of network NAME (layers, output shapes and parameter counts), or what a model
    file, run folder or shipped model NAME is: its network, classes, input and how it runs."""
    from ferkit.models import create_model, get_model_spec, list_models
    from ferkit.runtime import shipped_models

    if name not in list_models() and (name == "default" or name in shipped_models() or Path(name).exists()):
        _print_model_file(name)
        return
    model = create_model(name, weights="none" if get_model_spec(name).pretrained else None)
    rows = [[layer.name, type(layer).__name__, str(_output_shape(layer)), f"{layer.count_params():,}"] for layer in model.layers]
    _print_table(["layer", "type", "output shape", "params"], rows, right=(3,), title=f"{name}: {model.count_params():,} parameters")


def _print_model_file(name: str) -> None:
    """What `ferkit predict --model NAME` would run, from the metadata inside the file."""
    from ferkit.runtime import exported_model_path, is_shipped_file, read_metadata

    path = exported_model_path(name)  # a run folder's export, as predict runs it
    meta = read_metadata(path)
    extra = meta.extra
    rows = [["file", str(path)], ["network", meta.model], ["classes", ", ".join(meta.classes)],
            ["input", f"{meta.input_size[0]}x{meta.input_size[1]}x{meta.channels}" + (f", central {meta.crop}x{meta.crop} crop" if meta.crop else "")],
            ["test-time augmentation", meta.tta], ["temperature", f"{meta.temperature:g}"]]
    if "int8" in extra:
        rows.append(["int8", f"keeps the float model's top class on {extra['int8']['top1_agreement_with_float']:.1%} "
                             f"of {extra['int8'].get('agreement_faces', '?')} held-out faces"])
    if extra.get("run"):  # a shipped model's run lay on the machine that trained it: its name alone
        run = Path(extra["run"]).name if is_shipped_file(path) else str(extra["run"])
        rows.append(["trained in", run + (f", epoch {extra['epoch']}" if extra.get("epoch") is not None else "")])
    if extra.get("members"):
        rows.append(["members", ", ".join(member["model"] for member in extra["members"])])
    if extra.get("version"):
        rows.append(["version", str(extra["version"])])
    _print_table(["", Path(name).name], rows, right=(), fold=(0, 1), title=f"what ferkit predict --model {name} runs")


def _output_shape(layer):
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):
        return "?"


# --- train --------------------------------------------------------------------------------------


def config_options(config_class):
    """Click options made from a config dataclass's fields: --field-name (or the field's own flag), its type
    and choices, its help, and its default as the dataclass has it. Options default to None, meaning "not
    given", so that the dataclass stays the one place a default is set."""

    def decorate(command):
        for item in reversed(fields(config_class)):
            meta, name = item.metadata, item.name.replace("_", "-")
            default = item.default_factory() if item.default_factory is not MISSING else item.default
            help = f"{meta['help']} [default: {meta.get('default_text') or _shown_default(default)}]"
            if item.type == "bool":
                option = click.option(f"--{name}/--no-{name}", item.name, default=None, help=help)
            else:
                kind = click.Choice(meta["choices"]) if meta.get("choices") else _OPTION_TYPES.get(item.type, str)
                option = click.option(option_flag(item), item.name, type=kind, help=help)
            command = option(command)
        return command

    return decorate


_OPTION_TYPES = {"int": int, "float": float, "float | None": float}


def _shown_default(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(value) or "none"
    return "none" if value in (None, "") else str(value)


def _flags_to_args(flags: dict) -> list[str]:
    """`ferkit train` arguments that give these parsed options again (None: not given)."""
    args = []
    for item in fields(TrainConfig):
        value = flags.get(item.name)
        if value is None:
            continue
        name = item.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{name}" if value else f"--no-{name}")
        else:
            args += [option_flag(item), str(value)]
    return args


def config_from_flags(flags: dict) -> TrainConfig:
    """The TrainConfig for `ferkit train`'s options (None: not given, the dataclass default stands)."""
    return TrainConfig(**{k: v for k, v in flags.items() if v is not None})


@cli.command("train", short_help="Train a model, recording everything in a run folder.")
@config_options(TrainConfig)
@click.option("--resume", type=click.Path(path_type=Path), help="Continue the run in this folder where it stopped.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder at --out.")
@click.option("--local-processes", type=int,
              help="Train data-parallel as this many processes on this machine (JAX backend), e.g. one per GPU.")
@click.option("--coordinator", metavar="HOST:PORT", help="Data-parallel: where process 0 listens (JAX backend).")
@click.option("--num-processes", type=int, default=1, show_default=True, help="Data-parallel: processes in the job.")
@click.option("--process-id", type=int, default=0, show_default=True, help="Data-parallel: this process's number, 0 first.")
def train_cmd(resume: Path | None, overwrite: bool, local_processes: int | None, coordinator: str | None,
              num_processes: int, process_id: int, **flags):
    """Train a model and record everything in a run folder."""
    from ferkit.distributed import Topology, launch_local

    if resume and overwrite:
        raise FerkitError("--resume continues a run and --overwrite replaces one: give one of them")
    if local_processes is not None:
        ctx = click.get_current_context()
        given = [f"--{name.replace('_', '-')}" for name in ("coordinator", "num_processes", "process_id")
                 if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if local_processes < 1:
            raise FerkitError(f"--local-processes takes a count of processes, at least 1, not {local_processes}")
        if given:
            raise FerkitError(f"--local-processes sets {', '.join(given)} itself: give one or the other")
    topology = Topology(coordinator, num_processes, process_id)
    if resume:
        config = _resumed_config(resume, flags)
    else:
        if flags.get("init") and flags.get("model"):  # typed, even the default: it must be the network --init brings
            from ferkit.training_model import check_init_model

            check_init_model(flags["init"], flags["model"])
        config = config_from_flags(flags)

    from ferkit.runs import RunState, check_run_folder
    from ferkit.training import check_distributable, train

    if local_processes is not None:  # checked here once, not by every process after loading the data
        check_distributable(config, local_processes)
        check_run_folder(Path(config.out), resume=resume is not None, overwrite=overwrite)
        args = _flags_to_args(flags) + (["--resume", str(resume)] if resume else []) + (["--overwrite"] if overwrite else [])
        sys.exit(launch_local(local_processes, args))
    try:
        run = train(config, resume=resume is not None, overwrite=overwrite, verbose=1 if sys.stdout.isatty() else 2,
                    topology=topology)
    except (FerkitError, KeyboardInterrupt) as stop:
        from ferkit.distributed import exit_without_jax_teardown

        exit_without_jax_teardown(2 if isinstance(stop, FerkitError) else 130)
        raise
    if not topology.is_chief:
        return
    state = RunState.load(run)
    click.echo(
        f"done: {state.epochs_done} epoch{'s' if state.epochs_done != 1 else ''}, best val accuracy {state.best_val_accuracy:.4f} at epoch "
        f"{state.best_epoch}; run folder {run} (best.keras, history.csv, curves.png)"
    )
    import numpy as np

    # compared as Keras measured the run's accuracy, in float32: the same share of faces right is no gain
    if state.start_val_accuracy is not None and np.float32(state.best_val_accuracy) <= np.float32(state.start_val_accuracy):
        click.echo(f"warning: {state.start_model} scored {state.start_val_accuracy:.4f} on the same validation faces before "
                   "training: this run did not improve on it (a lower --lr, more faces or more epochs may)", err=True)


def _resumed_config(run: Path, flags: dict) -> TrainConfig:
    """The run's own config, with a new --epochs total (--fine-tune-epochs too, for a run that fine-tunes),
    --precision or --save-period, and --data, --val or --teacher where the run's data now is (moved, or the
    run started in another folder: relative paths count from there)."""
    from ferkit.runtime import is_shipped_model_name

    movable = {"data": "--data", "val": "--val", "teacher": "--teacher"}
    changeable = ("epochs", "fine_tune_epochs", "precision", "save_period")
    if {k for k, v in flags.items() if v is not None} - {*changeable, *movable}:
        raise FerkitError("with --resume only --epochs, --fine-tune-epochs, --precision and --save-period may change (and "
                          "--data, --val, --teacher say where the run's data is now); the rest comes from the run's config.json")
    if not (run / "config.json").exists():
        raise FerkitError(f"cannot resume: {run} is not a ferkit run folder (no config.json)")
    config = TrainConfig.load(run / "config.json")
    if flags.get("teacher") is not None and not config.teacher:
        raise FerkitError(f"{run} was trained without a teacher: --teacher with --resume only says where the run's own "
                          "teacher is now; distil in a new run (--init RUN --teacher ...)")
    if flags.get("fine_tune_epochs") is not None and not config.fine_tune:
        raise FerkitError(f"{run} does not fine-tune (no --fine-tune layers): --epochs sets how long it trains")
    changes = {key: flags[key] for key in (*changeable, *movable) if flags.get(key) is not None}
    config = replace(config, out=str(run), **changes)  # checked as a new config is: --epochs 0 is refused
    for key, flag in movable.items():
        where = getattr(config, key)
        if where and not Path(where).exists() and not (key == "teacher" and is_shipped_model_name(where)):
            if flags.get(key) is not None:
                raise FerkitError(f"{flag} {where}: no such file or folder")
            raise FerkitError(f"the run's {flag} {where} is not here (a relative path counts from where the run "
                              f"started); pass {flag} with where it is now")
    return config


# --- study --------------------------------------------------------------------------------------


@cli.command("study", short_help="The founding study in one command: train, compare and report its models.")
@click.option("--data", required=True, help="Training data: a class-folder tree, FER2013 CSV or packed dataset.")
@click.option("--val", required=True, help="Validation data every model is scored on.")
@click.option("--out", type=OUTPUT_PATH, default=Path("study"), show_default=True,
              help="Folder for report.html, study.json and the run folders (finished runs there are reused).")
@click.option("--models", default=",".join(STUDY_ENTRIES), show_default=True, help="Comma-separated entries to include.")
@click.option("--epochs", type=int, help="Epochs of the reference CNNs [default: 30; --quick: 2].")
@click.option("--transfer-epochs", type=int, help="Epochs of the transfer models' head, backbone frozen [default: 10; --quick: 1].")
@click.option("--fine-tune-epochs", type=int, help="Then epochs with the backbone's top layers trained [default: 10; --quick: 1] ...")
@click.option("--fine-tune-layers", type=int, help="... this many of them [default: all; --quick: 10].")
@click.option("--transfer-model", default=STUDY_TRANSFER_MODEL, show_default=True, help="The transfer network (`ferkit models`).")
@click.option("--transfer-weights", default="imagenet", show_default=True,
              help="Its ImageNet weights: imagenet, or a weights file (e.g. made by ferkit.models.efficientnet_lite_convert).")
@click.option("--subset", type=int, help="Train on the first N faces of each class [--quick: 20].")
@click.option("--photo", "photos", multiple=True, help="A photo to find faces and emotions in with every model (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of every run of the study.")
@click.option("--quick", is_flag=True, help="A few epochs on a small subset: checks the whole study in about two minutes.")
def study_cmd(data, val, out: Path, models: str, epochs, transfer_epochs, fine_tune_epochs, fine_tune_layers, transfer_model,
              transfer_weights, subset, photos, seed, quick):
    """The founding study in one command: train and compare its models, write one HTML report."""
    from ferkit.study import StudyConfig, command_line, study

    given = {"epochs": epochs, "transfer_epochs": transfer_epochs, "fine_tune_epochs": fine_tune_epochs,
             "fine_tune_layers": fine_tune_layers, "subset": subset}
    settings = {k: v for k, v in given.items() if v is not None}
    settings.update(out=str(out), models=[m.strip() for m in models.split(",") if m.strip()], photos=list(photos),
                    transfer_model=transfer_model, transfer_weights=transfer_weights, seed=seed, command=command_line())
    config = StudyConfig.quick(data, val, **settings) if quick else StudyConfig(data=data, val=val, **settings)
    report = study(config, verbose=1 if sys.stdout.isatty() else 2)
    click.echo(f"done: {report} (open it in a browser); figures in {report.parent / 'study.json'}")


# --- pack ---------------------------------------------------------------------------------------


@cli.command("pack", short_help="Write a dataset as memory-mapped shards, for data larger than memory.")
@click.argument("data")
@click.argument("out", type=OUTPUT_PATH)
@click.option("--usage", help="FER2013 CSV rows to pack: Training, PublicTest, PrivateTest or all (default: "
              "Training, the rows that train, as `ferkit train --data` reads a CSV).")
@click.option("--image-size", type=click.IntRange(8, 512), default=48, show_default=True,
              help="Side of the stored faces in pixels (the model's input size).")
@click.option("--shard-size", type=click.IntRange(min=1), default=100_000, show_default=True, help="Faces per .npy shard.")
@click.option("--classes", help="Comma-separated class list, to keep classes beyond the seven emotions (default: the seven).")
@click.option("--shuffle", is_flag=True, help="Write the faces in a random order (seeded by --seed), so that every shard "
              "holds faces of every class: for a data-parallel job whose processes each read their own shards.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --shuffle's order.")
@click.option("--overwrite", is_flag=True, help="Replace a packed dataset at OUT.")
def pack_cmd(data: str, out: Path, usage: str | None, image_size: int, shard_size: int, classes: str | None,
             shuffle: bool, seed: int, overwrite: bool):
    """Write DATA (a class-folder tree, a FER2013 CSV or a packed dataset) as a packed dataset in the new folder OUT: decoded
    faces in .npy shards, which training reads memory-mapped, a batch at a time."""
    from ferkit.data import load_dataset
    from ferkit.data.packed import check_pack_folder, pack_dataset
    from ferkit.results import check_out_outside_data

    if shard_size < 1:
        raise FerkitError("--shard-size must be at least 1")
    from ferkit.data.fer2013_csv import TRAIN_USAGE

    # by default a CSV's Training rows: with PublicTest among them, validation faces would train
    usage = _check_usage(data, usage or (TRAIN_USAGE if data.lower().endswith(".csv") else None), usage is not None)
    check_out_outside_data(out, data, "the packed faces")
    check_pack_folder(out, overwrite=overwrite)  # before minutes of loading, not after
    names = [name.strip() for name in classes.split(",") if name.strip()] if classes else None
    dataset = load_dataset(data, image_size=(image_size, image_size), usage=usage, classes=names, progress=True)
    folder = pack_dataset(dataset, out, shard_size=shard_size, overwrite=overwrite, packed_from=(data, usage),
                          shuffle_seed=seed if shuffle else None)
    shards = -(-len(dataset) // shard_size)
    rows = f" ({usage} rows)" if usage else ""
    order = f", shuffled with seed {seed}" if shuffle else ""
    click.echo(f"packed {len(dataset)} faces{rows} ({len(dataset.classes)} classes) into {shards} shard(s) in {folder}{order}")


@cli.command("crop", short_help="Crop every face out of photos (class folders of photos give class folders of faces).")
@click.argument("source")
@click.option("--out", type=OUTPUT_PATH, required=True, help="Folder for the face crops.")
@click.option("--detector", type=click.Choice(DETECTORS), default="auto", show_default=True,
              help="Face detector; none takes each whole image as one face, made square.")
@click.option("--model", help="The model whose face framing the crops take (default: the default shipped model).")
@click.option("--overwrite", is_flag=True, help="Replace files in --out that ferkit did not write, and crops of other photos of the same name.")
@click.option("--prune", is_flag=True,
              help="Remove the crops ferkit wrote in --out of photos that are no longer there (moved to another class, deleted).")
def crop_cmd(source: str, out: Path, detector: str, model: str | None, overwrite: bool, prune: bool):
    """Crop every face out of the photos in SOURCE (a folder, read recursively, a glob or a photo) into
    --out, keeping their folders: class folders of photos become class folders of faces to train on.
    Run again, it crops only new and changed photos: crops moved to another class or deleted by hand stay so."""
    from ferkit.data.crops import crop_faces
    from ferkit.labels import EMOTIONS, canonical_label
    from ferkit.progress import echo_error, progress_bar

    with progress_bar(None, "cropping faces") as advance:
        summary = crop_faces(source, out, detector=detector, model=model, overwrite=overwrite, prune=prune,
                             progress=advance, on_failure=lambda line: echo_error(f"error: {line}"))
    for photo in summary.repeats:
        click.echo(f"the same photo again, through a link, cropped once: {photo}", err=True)
    for photo in summary.without_faces:
        click.echo(f"no face found: {photo}", err=True)
    for photo in summary.several_faces:  # a group photo's class may not be every face's: worth a look
        click.echo(f"several faces, each cropped into the photo's folder: {photo}", err=True)
    for photo in summary.edited_before:
        click.echo(f"cropped again (changed, or cropped before with another detector or model), though some of its "
                   f"earlier crops had been moved or deleted by hand (check its crops in {out}): {photo}", err=True)
    loose = [path for path in summary.written if path.parent == out]
    if loose and canonical_label(out.name) not in (*EMOTIONS, "contempt"):  # --out faces/sad is a class folder
        click.echo(f"{len(loose)} face crop(s) written at the top of {out} (e.g. {loose[0].name}), in no class folder, "
                   f"are not training faces: crop a folder of class folders, or give --out {out / 'CLASS'}", err=True)
    if summary.stale and not prune:
        click.echo(f"{len(summary.stale)} face crop(s) in {out} of photos that are no longer there (moved to another "
                   f"class folder, or deleted), e.g. {summary.stale[0]}, are still training faces; --prune removes them",
                   err=True)
    pruned = f", {len(summary.stale)} crop(s) of photos no longer there removed" if prune and summary.stale else ""
    unchanged = f" ({len(summary.unchanged)} cropped before and unchanged, left as they are)" if summary.unchanged else ""
    click.echo(f"{summary.photos} photos{unchanged}, {len(summary.written)} faces written to {out}, "
               f"{len(summary.without_faces)} without a face, {len(summary.failed)} failed{pruned}")
    if summary.failed:
        sys.exit(1)


def _check_usage(data: str, usage: str | None, usage_given: bool) -> str | None:
    """--usage as FER2013 spells it, None for all rows. It picks rows of a FER2013 CSV; given with a folder
    it would be ignored without a word."""
    from ferkit.data.fer2013_csv import USAGES, check_usages, has_usage_column

    if usage_given and Path(data).is_dir():
        raise FerkitError(f"--usage selects rows of a FER2013 .csv file; {data} is a folder, whose faces are all used")
    if not usage or usage.lower() == "all":
        return None
    if Path(data).is_file() and data.lower().endswith(".csv") and not has_usage_column(data):
        if usage_given:
            raise FerkitError(f"--usage selects rows by their Usage column, which {data} lacks: every row is used")
        return None  # and no usage is named in what is written of it
    try:
        return check_usages(usage)[0]
    except FerkitError:
        raise FerkitError(f"unknown FER2013 usage {usage} (choose from {', '.join(USAGES)} or all)") from None


# --- evaluate -----------------------------------------------------------------------------------


@cli.command("evaluate", short_help="Score a model on labelled faces: accuracy, per-class F1, confusion matrix.")
@click.argument("model", required=False)
@click.option("--data", required=True, help="A class-folder tree, FER2013 CSV or packed dataset.")
@click.option("--usage", default="PublicTest", show_default=True,
              help="CSV rows to use: Training, PublicTest, PrivateTest or all.")
@click.option("--out", type=OUTPUT_PATH,
              help="Folder for the report files (default: RUN/eval-DATA for a run folder, eval-MODEL-DATA beside a "
                   "model file, runs/eval-MODEL-DATA for a shipped model).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Faces per model call.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON on stdout.")
@click.option("--overwrite", is_flag=True, help="Replace the reports of another evaluation in --out.")
@TTA_OPTION
def evaluate_cmd(model: str | None, data: str, usage: str, out: Path | None, batch_size: int, as_json: bool,
                 overwrite: bool, tta):
    """Score MODEL (a run folder, model file or shipped model's name; default: the default shipped
    model) on labelled data; write JSON, CSV, PNG and HTML reports."""
    from ferkit.data import load_dataset
    from ferkit.evaluation import check_report_folder, default_report_folder, evaluate
    from ferkit.predict import model_version
    from ferkit.progress import progress_bar
    from ferkit.results import check_out_outside_data, new_folder
    from ferkit.runs import (export_trained_on, held_out_faces, held_out_in_words, holds_its_training_faces,
                             members_in_words, members_trained_on, run_config_of, run_folder_of, trained_on)
    from ferkit.runtime import load_classifier

    given = click.get_current_context().get_parameter_source("usage") is not click.core.ParameterSource.DEFAULT
    usage = _check_usage(data, usage, given)
    check_out_outside_data(out, data, "the report's pictures")
    classifier = load_classifier(model).with_tta(tta)
    _say_the_export_predict_runs(model, classifier.path)
    run_folder, config = run_folder_of(classifier.path), run_config_of(classifier.path)
    run = config and trained_on(classifier.path, data, usage=None if Path(data).is_dir() else usage)  # as the run named its data
    # a run that split its validation faces off its data: scored on those where `data` is that data (its
    # faces, read from anywhere), as far as they can be told again
    split = held_out_in_words(config) if config and not config.val else ""
    if out is not None and not overwrite and Path(data).is_dir() and (run or not split):
        # a folder's source is its path (and which faces, where a run held some out): checked before it loads
        check_report_folder(out, classifier.name, str(Path(data)) + split, classifier.tta, model_version(classifier),
                            classifier.sha256)
    dataset = load_dataset(
        data, classes=classifier.classes, image_size=classifier.input_size, usage=usage, progress=True
    )  # the bar is gone before the JSON is printed
    held = held_out_faces(run_folder, config, dataset) if split else None
    seen = None  # a warning that the model was trained on these faces: in the terminal and the saved report
    if held is not None:
        dataset = replace(held, source=held.source + split)
        log.info("%s is the data %s was trained on: scoring the %d faces it held out for validation", data,
                 run_folder, len(dataset))
    elif run or holds_its_training_faces(classifier.path, dataset):
        seen = f"{data} is the data {run_folder} was trained on"
    elif export_trained_on(classifier.path, data, usage=None if Path(data).is_dir() else usage):
        seen = f"{data} is the data the run that made {classifier.path.name} was trained on"
    elif members := members_trained_on(classifier.metadata, data, usage=None if Path(data).is_dir() else usage):
        seen = f"{data} is the data the {members_in_words(classifier.metadata, members)} were trained on"
    if seen:
        seen += ": its accuracy there says little about faces it has not seen"
        log.warning("%s", seen)
    elif fitted_here := _temperature_fitted_on(classifier, dataset):
        seen = fitted_here
        log.warning("%s", seen)
    # a CSV's source says which rows, known once it is read
    evaluation = (classifier.name, dataset.source, classifier.tta, model_version(classifier), classifier.sha256)
    if out is None:
        out = default_report_folder(model, data, evaluation, usage=usage, tta=tta)
        check_out_outside_data(out, data, "the report's pictures")  # `--data .` in a shipped model's runs/
    elif not overwrite:
        check_report_folder(out, *evaluation)  # before the minutes of scoring, not after
    # a folder that cannot be made: said now, not after the scoring; one left empty by Ctrl-C: gone again
    with new_folder(out, "report folder"), progress_bar(len(dataset), f"scoring ({classifier.tta})") as advance:
        report = evaluate(classifier, dataset, batch_size=batch_size, progress=advance)
        report.warnings[:0] = [seen] if seen else []
        written = report.save(out, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "files": [str(p) for p in written]}, indent=2))
        return
    _print_report(report)
    click.echo(f"calibration: {report.ece_summary}")
    click.echo(f"wrote {', '.join(p.name for p in written)} to {out}")


def _temperature_fitted_on(classifier, dataset) -> str | None:
    """A caution where the model's temperature was fitted on these faces (as far as its record tells: the
    data's name and count of faces): its calibration error after the temperature flatters it there."""
    fit = classifier.metadata.extra.get("temperature")
    if classifier.temperature == 1 or not isinstance(fit, dict) or not dataset.source:
        return None
    if fit.get("data") == Path(dataset.source).name and fit.get("faces") == len(dataset):
        return (f"the model's temperature was fitted on these {len(dataset)} faces ({fit['data']}): its calibration error "
                "here flatters it (the export's held-out figure does not)")
    return None


def _say_the_export_predict_runs(model: str | None, scored: Path) -> None:
    """For a run folder with an export that runs otherwise than its best.keras (test-time augmentation, a
    temperature, int8): which file `predict RUN` runs, and how to score it."""
    from ferkit.runtime import exported_model_path, read_metadata

    export = exported_model_path(model)
    if export == scored:
        return
    meta = read_metadata(export)
    how = [f"{meta.tta} test-time augmentation" if meta.tta != "none" else "",
           f"temperature {meta.temperature:g}" if meta.temperature != 1 else "", "int8" if "int8" in meta.extra else ""]
    if any(how):
        log.warning("scoring %s; ferkit predict runs its export %s (%s): evaluate %s to score that", scored, export,
                    ", ".join(filter(None, how)), export)


def _print_report(report) -> None:
    rows = [
        [name, f"{s.precision:.3f}", f"{s.recall:.3f}", f"{s.f1:.3f}", str(s.support)]
        for name, s in report.per_class.items()
    ]
    title = f"{report.model_label} on {report.data}: accuracy {report.accuracy:.4f}, macro-F1 {report.macro_f1:.4f} ({len(report.y_true)} faces)"
    _print_table(["class", "precision", "recall", "f1", "support"], rows, title=title)
    if report.absent_classes_note:
        click.echo(f"note: {report.absent_classes_note}")
    short = [c[:8] for c in report.classes]
    matrix_rows = [[name, *map(str, row)] for name, row in zip(short, report.confusion_matrix)]
    _print_table(["true \\ predicted", *short], matrix_rows, title="confusion matrix (counts)")


# --- export -------------------------------------------------------------------------------------


@cli.command("export", short_help="Export a model to ONNX (float or int8), checked against the original.")
@click.argument("model")
@click.option("--onnx", "to_onnx", is_flag=True, required=True, help="Export to ONNX (the only format so far).")
@click.option("--out", type=OUTPUT_PATH, help="Output file (default: beside the model, .onnx).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--recalibrate-bn", is_flag=True,
              help="Re-measure batch-norm statistics on un-augmented --calibration faces before exporting.")
@click.option("--int8", is_flag=True, help="Quantize to int8 (faster on CPU), calibrated on --calibration faces.")
@click.option("--calibration", help="Faces for --recalibrate-bn and --int8 (default: the run's training data).")
@click.option("--tta", type=click.Choice(TTA_CHOICES), help="Record this test-time augmentation as the model's default.")
@click.option("--calibrate-temperature", "temperature_data", metavar="DATA",
              help="Fit the temperature that calibrates the model's confidence on these held-out labelled faces "
                   "(a FER2013 CSV gives its PublicTest rows) and store it in the model.")
def export_cmd(model: str, to_onnx: bool, out: Path | None, overwrite: bool, recalibrate_bn: bool, int8: bool,
               calibration: str | None, tta, temperature_data: str | None):
    """Export MODEL (a run folder or .keras file) to ONNX, checked to agree with Keras."""
    from ferkit.export import (
        TOLERANCE, check_tta, calibration_faces, export_onnx, export_path, exportable_model, temperature_faces,
    )
    from ferkit.runtime import read_metadata

    if not to_onnx:
        raise FerkitError("choose an export format: --onnx")
    if calibration and not (int8 or recalibrate_bn):
        raise FerkitError("--calibration applies to --int8 and --recalibrate-bn exports")
    check_tta(exportable_model(model), tta)
    export_path(model, out, overwrite=overwrite)  # before minutes of loading faces, not after
    faces = calibration_faces(model, calibration, progress=True) if int8 or recalibrate_bn else None
    held_out = temperature_faces(model, temperature_data, progress=True) if temperature_data else None
    path = export_onnx(model, out, overwrite=overwrite, calibration=faces, recalibrate_bn=recalibrate_bn, int8=int8, tta=tta,
                       temperature_data=held_out)
    click.echo(f"wrote {path} (the float model agrees with Keras within {TOLERANCE})")
    if int8:
        check = read_metadata(path).extra["int8"]
        click.echo(
            f"int8: keeps the float model's prediction on {check['top1_agreement_with_float']:.1%} of "
            f"{check['agreement_faces']} held-out faces"
        )
    if held_out is not None:
        meta = read_metadata(path)
        fitted = meta.extra["temperature"]
        unseen = fitted["held_out"]
        click.echo(f"temperature {meta.temperature:.3f} fitted on {fitted['faces']} faces: "
                   f"ECE {fitted['ece_before']:.4f} -> {fitted['ece_after']:.4f} on them, "
                   f"{unseen['ece_before']:.4f} -> {unseen['ece_after']:.4f} on the halves it was not fitted on "
                   f"({_views_in_words(meta.tta)})")
        if fitted["ece_after"] > fitted["ece_before"]:
            click.echo(f"warning: the temperature lowers the faces' log loss but raises their ECE; {fitted['faces']} faces "
                       "may be too few to fit it on (a few hundred or more held-out faces give a steadier one)", err=True)
        elif unseen["ece_after"] >= unseen["ece_before"]:
            click.echo("warning: the temperature does not lower the ECE of faces it was not fitted on "
                       f"(lower in {unseen['improved']:.0%} of {2 * unseen['splits']} fits): this model may be "
                       "better off without one", err=True)


def _views_in_words(tta: str) -> str:
    return {"none": "one view", "flip": "flip test-time augmentation", "tencrop": "ten-crop test-time augmentation"}[tta]


# --- ensemble -----------------------------------------------------------------------------------


@cli.command("ensemble", short_help="Average several models' probabilities into one model file.")
@click.argument("models", nargs=-1, required=True)
@click.option("--out", type=OUTPUT_PATH, required=True, help="The ensemble's .keras file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def ensemble_cmd(models: tuple[str, ...], out: Path, overwrite: bool):
    """Average the probabilities of MODELS (run folders or .keras files) in one model, saved to --out;
    evaluate it, export it (--calibration DATA for --int8) or predict with it like any model."""
    from ferkit.ensemble import ensemble_models

    path = ensemble_models(list(models), out, overwrite=overwrite)
    click.echo(f"wrote {path}: the mean of {len(models)} models' probabilities")


@cli.command("teacher", short_help="Save models' averaged probabilities of the training faces, for distillation.")
@click.argument("models", nargs=-1, required=True)
@click.option("--data", required=True, help="The training faces the students will learn from (folder tree, CSV or packed dataset).")
@click.option("--out", type=OUTPUT_PATH, required=True, help="The .npz file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@TTA_OPTION
def teacher_cmd(models: tuple[str, ...], data: str, out: Path, overwrite: bool, tta):
    """Save the averaged probabilities of MODELS (each with --tta, e.g. tencrop) for every face of
    --data, once, for `ferkit train --teacher FILE.npz`. A member given as such a file (.npz) joins the
    average as it is saved: make a slow teacher one model at a time."""
    from ferkit.teacher import save_teacher_probabilities

    import numpy as np

    path = save_teacher_probabilities(list(models), data, out, tta=tta, overwrite=overwrite, progress=True)
    with np.load(path) as saved:
        agree = float(np.mean(saved["probabilities"].argmax(axis=1) == saved["labels"])) if len(saved["labels"]) else 0.0
        click.echo(f"wrote {path}: {len(models)} model(s), {len(saved['labels'])} faces; "
                   f"the average's top class is the face's label for {agree:.2%} of them")


@cli.command("cache", short_help="Show or clear the cache of decoded datasets.")
@click.argument("action", type=click.Choice(["show", "clear"]), default="show")
def cache_cmd(action: str):
    """Show where decoded datasets are cached and how much space they take, or clear them."""
    from ferkit.data.cache import cache_dir, cache_files, clear_cache, files_size

    if cache_dir().exists() and not cache_dir().is_dir():
        raise FerkitError(f"the cache folder {cache_dir()} is a file, so nothing can be cached "
                          "(set FERKIT_CACHE_DIR to a folder)")
    if action == "clear":
        count, size = clear_cache()
        click.echo(f"removed {count} cached dataset(s), {size / 1e6:.1f} MB, from {cache_dir()}")
        return
    files = cache_files()
    size = files_size(files)
    click.echo(f"{cache_dir()}: {len(files)} cached dataset(s), {size / 1e6:.1f} MB (ferkit cache clear removes them)")


# --- serve --------------------------------------------------------------------------------------


@cli.command("serve", short_help="A local web page and JSON API for photos, webcam and videos.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 opens the server to your network.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--model", default=None, help="Run folder, .keras or .onnx file, or a shipped model by name (default: the default one).")
@click.option("--detector", type=click.Choice(["auto", "yunet", "mtcnn"]), default="auto", show_default=True,
              help="Face detector: auto takes yunet where installed, else mtcnn.")
@click.option("--max-upload-mb", default=10.0, show_default=True, type=POSITIVE,
              help="Largest photo upload in MB of 2^20 bytes, a form's own bytes included (larger ones get HTTP 413).")
@click.option("--max-video-mb", default=50.0, show_default=True, type=POSITIVE, help="The same for a video.")
@click.option("--max-video-seconds", default=60.0, show_default=True, type=POSITIVE,
              help="Longest video analysed, in seconds (longer ones get HTTP 413).")
@click.option("--max-megapixels", default=40.0, show_default=True, type=POSITIVE,
              help="Most pixels a photo is decoded at; a larger JPEG is decoded at 1/2 to 1/8 scale to fit, other "
                   "images get HTTP 413.")
@click.option("--concurrency", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Analyses at a time; more requests wait their turn.")
@click.option("--max-waiting", default=32, show_default=True, type=click.IntRange(0, 10_000),
              help="Uploads held in memory, arriving or waiting for their turn; more get HTTP 503 (busy, retry).")
def serve_cmd(host: str, port: int, model, detector: str, max_upload_mb: float, max_video_mb: float,
              max_video_seconds: float, max_megapixels: float, concurrency: int, max_waiting: int):
    """A local web page (photos, webcam, videos) and JSON API (POST /v1/analyze, POST /v1/video) at http://HOST:PORT."""
    from ferkit.serve import ServeConfig, serve

    config = ServeConfig(model=model, detector=detector, max_upload_mb=max_upload_mb, max_video_mb=max_video_mb,
                         max_video_seconds=max_video_seconds, max_megapixels=max_megapixels, concurrency=concurrency,
                         max_waiting=max_waiting)
    serve(config, host=host, port=port)


# --- predict ------------------------------------------------------------------------------------


@cli.command("predict", short_help="Find every face in photos, folders or videos and predict its emotion.")
@click.argument("sources", nargs=-1, required=True)
@click.option("--model", help="A run folder, .keras or .onnx file, or a shipped model by name (default: the default one).")
@click.option("--detector", type=click.Choice(DETECTORS), default="auto", show_default=True,
              help="Face detector; 'none' treats each whole image as one face (for cropped face photos), made square.")
@click.option("--box", "boxes", multiple=True, metavar="X,Y,W,H",
              help="A face box to classify instead of detecting (repeatable); for single images.")
@click.option("--out", default="runs/predict", show_default=True,
              help="Folder for annotated images, JSON, CSV, timelines and plots (--engine ray: also an object-storage URI).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON (JSON lines for several images).")
@click.option("--annotate/--no-annotate", default=None, help="Write annotated images (default: for single images).")
@click.option("--every", type=click.IntRange(min=1), help="Videos: analyse every Nth frame (default: about 5 per second).")
@click.option("--fps", "target_fps", type=POSITIVE,
              help="Videos: analyse about this many frames per second.")
@click.option("--smooth", type=click.IntRange(min=1), default=1, show_default=True,
              help="Videos: smooth each face over ~N analysed frames.")
@click.option("--save-video", is_flag=True, help="Videos: also write an annotated video.")
@click.option("--uncertain-below", type=float, default=UNCERTAIN_BELOW, show_default=True,
              help="Mark faces whose top probability is below this as uncertain ('?' after the emotion); 0: never.")
@click.option("--resume", is_flag=True,
              help="Folders and globs: skip the images already in --out's results.jsonl (a run cut short) and append; --engine ray: run only the tasks without output parts.")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier batch's results in --out, and files there of the names ferkit writes that it did not write.")
@TTA_OPTION
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="'ray': run on a Ray cluster (ferkit[ray]) and write sharded Parquet and JSONL to --out; "
                   "SOURCE may also be a list file (.txt, a path or URI per line) or an object-storage URI.")
@click.option("--address", help="--engine ray: a running cluster ('auto' or HOST:PORT); default: start one here.")
@click.option("--workers", type=click.IntRange(min=1), help="--engine ray: model copies (actors); default: one per CPU.")
@click.option("--shard-size", type=click.IntRange(min=1), default=SHARD_IMAGES, show_default=True,
              help="--engine ray: images per task and per output part.")
def predict_cmd(sources, model, detector, boxes, out: str, as_json, annotate, every, target_fps, smooth, save_video,
                uncertain_below, resume, overwrite, tta, engine, address, workers, shard_size):
    """Find every face in each SOURCE (image, folder, glob or video) and predict its emotion."""
    from ferkit.batch import (
        FolderBatch,
        check_not_another_images_copy,
        check_not_another_photos_results,
        check_output_folder,
        check_results_folder,
        model_the_batch_began_with,
        video_outputs,
    )
    from ferkit.faces import get_detector
    from ferkit.predict import check_uncertain_below
    from ferkit.results import check_replaceable, new_folder
    from ferkit.runtime import load_classifier

    check_uncertain_below(uncertain_below)
    if every is not None and target_fps is not None:
        raise FerkitError("--every (a frame count) and --fps (frames per second) are alternatives; give one")
    detector_given = click.get_current_context().get_parameter_source("detector") is not click.core.ParameterSource.DEFAULT
    if boxes and detector_given:
        raise FerkitError("--box gives the faces, so no detector looks for them; give --box or --detector")
    if not out.strip():
        raise FerkitError("--out is empty; give a folder for the results")
    if address is not None and not address.strip():
        raise FerkitError("--address is empty; give 'auto' or the cluster head's HOST:PORT, or leave it out to start one here")
    if engine == "ray":
        given = {"--box": bool(boxes), "--json": as_json, "--annotate": bool(annotate), "--save-video": save_video,
                 "--overwrite": overwrite}  # a Ray run's parts are never written over: choose another --out
        if any(given.values()):
            raise FerkitError(f"{', '.join(k for k, v in given.items() if v)}: not with --engine ray")
        _predict_on_ray(RayPredictConfig(
            sources=list(sources), out=out, model=model, detector=detector, address=address, workers=workers,
            shard_size=shard_size, uncertain_below=uncertain_below, tta=tta, every=every, target_fps=target_fps,
            smooth=smooth, resume=resume))
        return
    if address or workers:
        raise FerkitError("--address and --workers apply to --engine ray")
    if "://" in out:
        raise FerkitError(f"--out {out}: an object-storage URI needs --engine ray; give a folder here")
    out = Path(out)
    if resume and overwrite:
        raise FerkitError("--resume continues the results in --out and --overwrite replaces them; give one")
    kinds, missing = [], 0
    for source in sources:
        try:
            kinds += _kinds_of(source)
        except FerkitError as err:
            if len(sources) == 1:
                raise
            click.echo(f"error: {err}", err=True)
            missing += 1
    kinds = _each_file_once(kinds)
    _check_options_fit_sources(kinds, annotate=annotate, every=every, target_fps=target_fps, smooth=smooth,
                               save_video=save_video)
    kinds, unplayable = _videos_only_if_playable(kinds)  # before any work, not after the photos of a batch
    given_sources = len(kinds) + missing + unplayable  # a batch is a batch, whatever could not be read of it
    given = [_parse_box(text) for text in boxes] or None
    if given and (given_sources != 1 or kinds[0][1] != "image"):
        raise FerkitError("--box applies to a single image")
    images = [s for s, kind in kinds if kind == "image"]
    batch = [s for s, kind in kinds if kind != "video"] if given_sources > 1 or not images else []
    if resume and not batch:
        raise FerkitError("--resume continues a batch of photos (a folder, a glob, several sources); a single "
                          "photo has none to continue, and videos are analysed whole each time")
    if batch:
        check_results_folder(out, resume=resume, overwrite=overwrite)
    else:
        check_output_folder(out)
        for image in images:
            outputs = _photo_outputs(out, image, annotate is not False)
            check_replaceable(outputs, overwrite=overwrite)
            check_not_another_photos_results(outputs[0], image, overwrite=overwrite)
            if annotate is not False:
                check_not_another_images_copy(out, image, outputs[1], overwrite=overwrite)
    videos = _video_stems([s for s, kind in kinds if kind == "video"], out, save_video,
                          photos=[(s, kind) for s, kind in kinds if kind != "video"])
    for _, stem in videos:
        check_replaceable(video_outputs(out, stem, save_video), overwrite=overwrite)
    classifier = load_classifier(model, prefer_export=True).with_tta(tta)
    if batch and resume:
        classifier = model_the_batch_began_with(classifier, model, out, tta)
    find = get_detector(detector)
    with new_folder(out):  # gone again if nothing could be written there (a single unreadable photo, say)
        failures = missing
        if images and not batch:
            failures += _predict_one(images[0], classifier, find, out, as_json, annotate is not False, given,
                                     uncertain_below=uncertain_below)
        elif batch:
            failures += _predict_many(FolderBatch(batch, out, model=classifier, detector=find, annotate=bool(annotate),
                                                  uncertain_below=uncertain_below, resume=resume, overwrite=overwrite,
                                                  alone=given_sources == 1),
                                      as_json, unreadable_sources=failures)
        failed_videos = sum(_predict_video(source, out, as_json, stem=stem, alone=given_sources == 1, model=classifier,
                                           detector=find, every=every, target_fps=target_fps, smooth=smooth,
                                           save_video=save_video, uncertain_below=uncertain_below, overwrite=overwrite)
                            for source, stem in videos)
        if failed_videos and not as_json:  # the photos' summary line, printed before the videos, does not count them
            click.echo(f"{failed_videos} of {len(videos)} video(s) failed")
        failures += failed_videos + unplayable
        if failures:
            sys.exit(1)


def _video_stems(videos: list[str], out: Path, save_video: bool, photos=()) -> list[tuple[str, str]]:
    """Each video with its name for its files in `out`: its own, or clip-2, clip-3, ... where videos of
    different folders share one, or where a file it would write is one of the videos given or a photo the
    batch analyses (`photos`: its other sources and their kinds; a user's x.annotated.mp4 beside x.mp4, or
    photo x.emotions.png, which --overwrite would otherwise write over)."""
    from ferkit.batch import unique_path, video_outputs, video_stem
    from ferkit.draw import written_by_ferkit
    from ferkit.images import IMAGE_SUFFIXES

    given = {os.path.realpath(video) for video in videos}
    stems: set[str] = set()
    named = []

    def taken(path: Path) -> bool:
        if os.path.realpath(path) in given:
            return True
        return (path.suffix.lower() in IMAGE_SUFFIXES and path.exists() and not written_by_ferkit(path)
                and _one_of_the_photos(path, photos))

    for video in videos:
        stem = unique_path(out, video_stem(Path(video).stem), "", stems).name
        while any(taken(path) for path in video_outputs(out, stem, save_video)):
            stem = unique_path(out, video_stem(Path(video).stem), "", stems).name
        named.append((video, stem))
    return named


def _one_of_the_photos(path: Path, photos) -> bool:
    """Whether the existing file `path` is one that the photo sources `photos` ((source, kind): an image,
    a folder or a glob) name."""
    import glob

    real = Path(os.path.realpath(path))
    for source, kind in photos:
        if kind == "image" and os.path.realpath(source) == str(real):
            return True
        if kind == "folder" and real.is_relative_to(os.path.realpath(source)):
            return True
        if kind == "glob" and str(real) in {os.path.realpath(p) for p in glob.glob(source, recursive=True)}:
            return True
    return False


def _check_options_fit_sources(kinds, *, annotate, every, target_fps, smooth, save_video) -> None:
    """Options for videos with photos only, or --annotate with videos only, are refused, not ignored."""
    videos = [kind == "video" for _, kind in kinds]
    for_videos = {"--every": every is not None, "--fps": target_fps is not None, "--smooth": smooth != 1,
                  "--save-video": save_video}
    if videos and not any(videos) and any(for_videos.values()):
        raise FerkitError(f"{', '.join(k for k, v in for_videos.items() if v)}: for videos, and no source is one")
    if videos and all(videos) and annotate:
        raise FerkitError("--annotate draws on photos; for a video, --save-video writes an annotated copy")


def _each_file_once(kinds: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The photos and videos given, each file once however often (or by whatever route) it was named;
    folders and globs keep their place (a batch lists each of their files once)."""
    seen, once = set(), []
    for source, kind in kinds:
        if kind in ("image", "video"):
            real = Path(source).resolve()
            if real in seen:
                continue
            seen.add(real)
        once.append((source, kind))
    return once


def _videos_only_if_playable(kinds: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int]:
    """Without the video extra, the videos among photos are reported as errors and left out (the photos
    go on); videos alone are refused in one line."""
    from ferkit.extras import require

    if not any(kind == "video" for _, kind in kinds):
        return kinds, 0
    try:
        require("cv2", "reading videos")
        require("matplotlib", "plotting emotions over time", extra="video")
    except FerkitError as err:
        videos = [source for source, kind in kinds if kind == "video"]
        if len(videos) == len(kinds):
            raise
        for video in videos:
            click.echo(f"error: {video}: {err}", err=True)
        return [(source, kind) for source, kind in kinds if kind != "video"], len(videos)
    return kinds, 0


def _kinds_of(source: str) -> list[tuple[str, str]]:
    """(source, kind) pairs for one SOURCE: a glob's videos become sources of their own, after its images;
    a folder's videos are left out, with a note."""
    from ferkit.sources import list_images, source_kind, videos_of

    kind = source_kind(source)
    if kind not in ("glob", "folder"):
        return [(source, kind)]
    videos = videos_of(source)
    if kind == "folder":
        return [(source, kind)]
    try:
        list_images(source, quiet=True)  # its notes come when the batch lists it
    except FerkitError:
        if videos:
            return [(str(v), "video") for v in videos]
        raise
    return [(source, kind)] + [(str(v), "video") for v in videos]


def _predict_on_ray(config) -> None:
    from ferkit.ray_predict import predict_with_ray

    summary = predict_with_ray(config)
    for error in summary["errors"] + summary["failures"]:
        click.echo(f"error: {error}", err=True)
    videos = f", {summary['videos']} videos ({summary['video_faces']} faces)" if summary["videos"] else ""
    skipped = f" ({summary['skipped_tasks']} tasks done before)" if summary["skipped_tasks"] else ""
    click.echo(f"{summary['images']} images, {summary['faces']} faces{videos}, {summary['failed']} failed{skipped}; "
               f"wrote {config.out}/faces/*.parquet and {config.out}/results/*.jsonl")
    if summary["failed"] or summary["errors"]:
        sys.exit(1)


def _parse_box(text: str) -> tuple[int, int, int, int]:
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise FerkitError(f"a box is four whole numbers X,Y,W,H, not {text!r}") from None
    if w <= 0 or h <= 0:
        raise FerkitError(f"a box needs a positive width and height, not {text!r}")
    return x, y, w, h


def _predict_one(source, classifier, find, out: Path, as_json: bool, annotate: bool, boxes=None, *,
                 uncertain_below: float = UNCERTAIN_BELOW) -> int:
    from ferkit.draw import save_annotated
    from ferkit.predict import analyze_images

    [result] = analyze_images([source], model=classifier, detector=find, boxes=boxes, uncertain_below=uncertain_below)
    if result.error and (boxes or result.image_size is None):
        raise FerkitError(result.error)  # the photo given is not an image, or a box given is wrong for it: bad input
    if result.error:
        click.echo(f"error: {result.error}", err=True)
        return 1
    written = _photo_outputs(out, source, annotate)
    _write_json(written[0], result.to_dict())
    if annotate:
        save_annotated(result.draw(source), written[1])
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return 0
    _print_faces(result)
    click.echo(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _photo_outputs(out: Path, source: str, annotate: bool) -> list[Path]:
    """The files `ferkit predict` writes for one photo: its JSON, then its annotated copy."""
    from ferkit.sources import ANNOTATED_SUFFIX, fitting_name

    stem = fitting_name(Path(source).stem, ANNOTATED_SUFFIX).removesuffix(ANNOTATED_SUFFIX)  # the longer suffix
    return [out / f"{stem}.faces.json"] + ([out / f"{stem}{ANNOTATED_SUFFIX}"] if annotate else [])


def _bar_beside(as_json: bool) -> bool:
    """Whether a progress bar may show while results are printed: not when JSON lines go to the terminal
    that shows the bar, where they would be torn through it."""
    return not (as_json and sys.stdout.isatty())


def _predict_many(batch, as_json: bool, unreadable_sources: int = 0) -> int:
    from ferkit.progress import echo_error, progress_bar

    for error in batch.errors:
        click.echo(f"error: {error}", err=True)
    if batch.skipped:
        click.echo(f"resuming: {batch.skipped} images already in {batch.out / batch.results.LINES}", err=True)
    with progress_bar(len(batch.todo), "analysing images", enabled=_bar_beside(as_json)) as advance:
        for result, record in batch.run_records():
            advance()
            if as_json:
                click.echo(json.dumps(record))  # as results.jsonl has it
            if result.error:
                echo_error(f"error: {result.error}")
    if not as_json and batch.skipped and not batch.todo and not batch.errors:
        click.echo(f"nothing left to do: all {batch.skipped} images are in {batch.out / batch.results.LINES}")
    elif not as_json:
        missing = f", {unreadable_sources + len(batch.errors)} source(s) not found or without images" \
            if unreadable_sources or batch.errors else ""
        in_all = f" ({batch.skipped + batch.images} in all)" if batch.skipped else ""
        click.echo(f"{batch.images} images{in_all}, {batch.faces} faces, {batch.failed} failed{missing}; "
                   f"wrote {batch.out / batch.results.TABLE} and {batch.out / batch.results.LINES}")
    return batch.failed + len(batch.errors)


def _predict_video(source, out: Path, as_json: bool, *, stem: str, alone: bool, **options) -> int:
    """Analyse one video; 1 if it cannot be analysed, one of several sources (a single one is bad input: raised)."""
    from ferkit.batch import analyze_video_into_folder
    from ferkit.progress import progress_bar

    with progress_bar(None, f"analysing {Path(source).name}", enabled=_bar_beside(as_json)) as advance:
        try:
            summary = analyze_video_into_folder(source, out, stem=stem, progress=advance, **options)
        except FerkitError as err:
            if alone:
                raise
            click.echo(f"error: {err}", err=True)
            if as_json:  # a record for each source, as a photo that fails has
                click.echo(json.dumps({"source": str(source), "error": str(err)}))
            return 1
    if as_json:
        click.echo(json.dumps(summary))
    else:
        cut = " (the file seems cut short)" if summary["cut_short"] else ""
        cut += f" ({summary['frames_failed']} could not be analysed)" if summary.get("frames_failed") else ""
        plotted = f" (the plot shows the {summary['tracks_plotted']} longest)" if summary["tracks_plotted"] < summary["tracks"] else ""
        click.echo(f"{source}: {summary['frames_analysed']} frames analysed (every {summary['every']}){cut}, "
                   f"{summary['tracks']} face tracks{plotted}; wrote {', '.join(summary['files'])}")
    return 0


def _print_faces(result) -> None:
    if not result.faces:
        # a detector needs a face with some of the photo around it; a crop of the face alone is no photo to it
        crop = " (a cropped face? --detector none takes the whole image as the face)" if max(result.image_size) <= CROPPED_FACE_SIDE else ""
        click.echo(f"{result.source}: no face found{crop}")
        return
    rows = [[str(i), ", ".join(map(str, f.box)), f.emotion + ("?" if f.uncertain else ""), f"{f.score:.1%}"]
            for i, f in enumerate(result.faces, 1)]
    _print_table(["face", "box (x, y, w, h)", "emotion", "confidence"], rows, right=(0, 3),
                 title=f"{result.source}: {len(result.faces)} face(s), model {_model_name(result)}")


def _model_name(result) -> str:
    """What --model takes to score with the same model again: a shipped model's name, a run folder or a
    file name (its version up to the parenthesis), rather than the network's name."""
    from ferkit.predict import model_named_by

    return model_named_by(result.model_version) or result.model


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# --- helpers ------------------------------------------------------------------------------------


def _print_table(columns, rows, *, title: str | None = None, right=None, fold=(0,)) -> None:
    """A rich table; columns after the first are right-aligned unless `right` names the ones that are. The
    columns in `fold` (names, paths) are folded when narrow, never cut short; the others end in an ellipsis."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # plain text: "photo [copy].jpg" is a name, not rich markup

    right = range(1, len(columns)) if right is None else right
    table = Table(title=Text(title) if title else None, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(Text(column), justify="right" if i in right else "left", overflow="fold" if i in fold else "ellipsis")
    for row in rows:
        table.add_row(*map(Text, row))
    console = Console(soft_wrap=True)
    console.on_broken_pipe = _raise_broken_pipe  # rich would exit 1; the CLI ends a closed pipe one way
    console.print(table)


def _raise_broken_pipe():
    raise BrokenPipeError


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="ferkit")


if __name__ == "__main__":
    main()
