"""train(config) -> run folder. Reads top to bottom: run folder, data, model, callbacks, fit.

The stages live in their own modules: ferkit.training_data (faces, targets, what `fit` gets),
ferkit.training_model (network, augmentation, optimizer), ferkit.callbacks (what is written after each
epoch), ferkit.checkpoints (what a resume continues from) and ferkit.runs (the run folder's files).
Keras is imported only when training starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ferkit._keras import check_keras_installed, import_keras
from ferkit.checkpoints import (
    BACKUP, FINE_TUNE_BACKUP, backed_up_epochs, has_checkpoint, keeps_its_precision, restore_packed_best_model,
    resume_training_model, resumes_unfrozen,
)
from ferkit.config import SEEDS, TrainConfig
from ferkit.distributed import LOCAL_PROCESSES, Topology, check_same_settings, device_names, lost_a_peer
from ferkit.distributed import start as start_distributed
from ferkit.errors import FerkitError, first_line
from ferkit.images import faces_to_batch
from ferkit.models import check_weights, get_model_spec
from ferkit.results import check_creatable, check_out_outside_data
from ferkit.runs import (
    EPOCHS_FOLDER, HELD_OUT_DIGEST, RESUMES, TRAIN_DIGEST, RunState, check_run_folder, clear_run_folder, faces_digest,
    hold_run_folder, read_history, record_resume, recorded_teacher, release_run_folder, rewrite_history, save_run_config,
    whole_counts,
)
from ferkit.teacher import check_teacher, teacher_digest, teacher_file, teacher_probabilities
from ferkit.training_data import (
    check_validation_faces_unseen, faces_this_process_reads, fit_data, load_train_val, train_size,
    trains_on_cached_features, validation_size,
    warn_of_a_small_validation_set,
    warn_of_classes_with_few_faces,
)
from ferkit.training_model import (
    adopt_init_model, build_training_model, check_fine_tuning, feature_head, float32_twin, init_model, network_metadata, network_of,
    prepare_fine_tuning,
)

log = logging.getLogger("ferkit")


class TrainingInterrupted(FerkitError):
    exit_code = 130


class TrainingDiverged(FerkitError):
    exit_code = 1


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, verbose: int = 2,
          callbacks: list | None = None, topology: Topology | None = None) -> Path:
    """Train `config.model` on `config.data`; returns the run folder. `verbose`: 0 silent, 1 bar, 2 line.
    `callbacks`: Keras callbacks of your own, run after ferkit's (which record the run).

    `kill` (SIGTERM) or Ctrl-C stops at the end of the current batch; the epoch under way is dropped, so
    the run folder holds complete epochs only, and TrainingInterrupted says how to resume. A second
    Ctrl-C stops at once.

    `topology`: this process's place in a data-parallel job (ferkit.distributed); process 0 writes the
    run folder, the others a temporary copy.

    `config` itself is left as it was given; the run folder's config.json records what training resolved
    (the data's classes, the network an `init` model brought). Python's and NumPy's random states are
    seeded for the run and then given back as the caller had them."""
    if not isinstance(config, TrainConfig):
        raise FerkitError(f"train takes a TrainConfig, not {type(config).__name__}; to go on with a run folder: "
                          "train(TrainConfig.load(run / 'config.json'), resume=True)")
    check_keras_installed()  # before data loading asks for the evaluate extra, which training's includes
    caller = random.getstate(), np.random.get_state()  # seeded for the run, then given back as they were
    try:
        return _train_in_place(dataclasses.replace(config), resume, overwrite, verbose, callbacks, topology or Topology())
    finally:
        random.setstate(caller[0])
        np.random.set_state(caller[1])


def _train_in_place(config: TrainConfig, resume: bool, overwrite: bool, verbose: int, callbacks,
                    topology: Topology) -> Path:
    """train() where this process's part of the job is done: the run folder itself, or, for a process
    other than the first, a temporary copy."""
    if topology.coordinator:
        check_distributable(config, topology.num_processes)
        start_distributed(topology)
    if topology.is_chief:
        run = Path(config.out)
        try:
            if run.is_dir():
                hold_run_folder(run)
            return _train(config, run, resume, overwrite, verbose, callbacks, topology)
        finally:
            release_run_folder(run)
    check_run_folder(Path(config.out), resume=resume, overwrite=overwrite)  # fail as process 0 will
    with tempfile.TemporaryDirectory(prefix="ferkit-worker-") as folder:
        if resume:
            shutil.copytree(config.out, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(EPOCHS_FOLDER))
        _train(config, Path(folder), resume, True, verbose, callbacks, topology)
    return Path(config.out)


def _check_resumes_its_own_run(config: TrainConfig, run: Path) -> None:
    """Resuming continues the run as it was set up; its config.json is rewritten with what may change only."""
    recorded = TrainConfig.load(run / "config.json")
    changed = config.settings_changed_from(recorded)
    if config.precision != recorded.precision and keeps_its_precision(run):
        changed.append("precision, which a whole saved model (an older run folder) keeps")
    done = backed_up_epochs(run) or RunState.load(run).epochs_done  # as _train counts them
    if recorded.fine_tune and done > recorded.epochs and config.epochs != recorded.epochs:
        raise FerkitError(f"{run} is fine-tuning (epoch {done}; its backbone was unfrozen after {recorded.epochs} "
                          f"epochs), so its first phase can no longer change length: resume it with --epochs "
                          f"{recorded.epochs}")
    if config.lr_schedule == "cosine" and config.epochs != recorded.epochs:
        log.info("the cosine schedule now spans %d epochs instead of %d: the learning rate follows the new curve "
                 "from the epoch where the run stopped", config.epochs, recorded.epochs)
    if changed:
        raise FerkitError(f"{run} was trained with other settings ({', '.join(changed)}); resume it with its own "
                          "config.json, changing only the epochs (fine-tuning's too), the precision and where its "
                          "data is")


def _train(config: TrainConfig, run: Path, resume: bool, overwrite: bool, verbose: int, callbacks, topology) -> Path:
    train_set, val_set = _check_and_load(config, run, resume, overwrite, verbose, topology)
    if topology.coordinator:
        # the faces per class too: the same path may hold other data on each machine, and then batches differ
        counts = {"train faces": train_set.class_counts(), "val faces": val_set.class_counts() if val_set is not None else None}
        check_same_settings({**dataclasses.asdict(config), **counts})
    if not resume:
        warn_of_classes_with_few_faces(train_set)
    state = RunState.load(run) if resume else RunState()
    if resume:  # a kill between the backup and state.json leaves the backup one epoch ahead
        state.epochs_done = backed_up_epochs(run) or state.epochs_done
        restore_packed_best_model(import_keras(), run, config)
    total = config.total_epochs
    if state.epochs_done >= total:
        option = "--fine-tune-epochs" if config.fine_tune and state.epochs_done >= config.epochs else "--epochs"
        log.warning("%s already has %d epochs; pass a larger %s to train on", run, state.epochs_done, option)
        return run
    if resume:
        _warn_of_exports(run)
    size = train_size(config, train_set, topology)
    teacher = teacher_probabilities(config.teacher, train_set) if config.teacher else None

    keras = import_keras()
    from ferkit.callbacks import StopOnSignal

    keras.utils.set_random_seed((config.seed + state.epochs_done) % SEEDS)
    keras.mixed_precision.set_global_policy(config.precision)
    stop = StopOnSignal()
    started = False  # whether the run folder holds this run yet
    try:
        # Ctrl-C and kill from here on stop the run at the end of a batch; before fit, on its way in. (Python's
        # own handler can lose a Ctrl-C: one raised inside a garbage-collection callback, as JAX has, is dropped.)
        with stop.listening():
            if resume and has_checkpoint(run):
                model = resume_training_model(keras, run, config, len(config.classes), size, state.epochs_done)
            else:  # a new run, or one stopped before its first epoch ended (its figure to beat kept)
                state = RunState(start_val_accuracy=state.start_val_accuracy, start_model=state.start_model)
                model = _new_training_model(keras, config, size)
            data = fit_data(config, train_set, val_set, topology=topology, first_epoch=state.epochs_done, teacher=teacher)
            if stop.requested:
                raise KeyboardInterrupt
            # Only now that data and model are known to be good does the run folder change.
            if not resume:
                check_validation_faces_unseen(faces_this_process_reads(train_set, topology), val_set, given=config.val)
                warn_of_a_small_validation_set(val_set)  # once training is sure to start: not before an error
                state.start_val_accuracy, state.start_model = _log_starting_score(config, val_set)
                if stop.requested:  # during the starting score: the folder (an --overwrite target) is still as it was
                    raise KeyboardInterrupt
                _hold_new_run_folder(run, overwrite)
                _say_what_is_kept(run, clear_run_folder(run))
            started = True
            _start_run_folder(run, config, state, train_set, val_set, topology, resumed=resume and state.epochs_done > 0)
            record = _run_callbacks(keras, run, config, state, model, train_set, stop, val_faces=len(val_set),
                                    padded_val_faces=validation_size(config, val_set, topology))
            _fit_phases(keras, model, config, dict(**data, verbose=verbose), record, callbacks, state, size, stop, run)
        if stop.requested:
            raise KeyboardInterrupt
        if stop.diverged_in:
            state.status = "diverged"
            state.save(run)
            raise TrainingDiverged(_diverged_message(Path(config.out), stop.diverged_in, state.epochs_done))
    except KeyboardInterrupt:
        if not (started or resume):
            raise TrainingInterrupted(f"interrupted before training began; {config.out} was not written") from None
        _mark_interrupted(run, state)
        raise TrainingInterrupted(_interrupted_message(Path(config.out), state.epochs_done, total, topology)) from None
    except Exception as err:
        if not (topology.coordinator and lost_a_peer(err)):
            raise
        _mark_interrupted(run, state)
        raise TrainingInterrupted(f"another process of the job stopped ({first_line(err)[:120]}); "
                                  + _interrupted_message(Path(config.out), state.epochs_done, total, topology)) from None
    finally:
        keras.mixed_precision.set_global_policy("float32")
    state.status = "finished"
    state.save(run)
    return run


def _log_starting_score(config: TrainConfig, val_set) -> tuple[float | None, str | None]:
    """With --init, what the model trained from scores on the validation faces before any training, one
    view as validation scores: the figure the run has to beat (and, from a shipped ensemble, which trains
    its first network, the ensemble's own). Where the run's classes differ from the model's, it chooses
    among the run's classes it knows (a new class is never its answer). A model that cannot be scored is
    passed over. Returns the best of these scores and what scored it (None, None without one)."""
    best: tuple[float | None, str | None] = (None, None)
    if not config.init or len(val_set) == 0:
        return best
    from ferkit.runtime import is_shipped_model_name, open_classifier, resolve_model_path
    from ferkit.training_model import init_model_path

    network = init_model_path(config.init)
    starts = [(f"the --init network ({network.name})", network)]
    if is_shipped_model_name(config.init) and resolve_model_path(config.init) != network:
        starts.append((f"the shipped {config.init} model itself", config.init))
    for what, model in starts:
        try:
            classifier = open_classifier(model).with_tta("none")
            if tuple(classifier.input_size) != val_set.images.shape[1:]:
                return best
            accuracy, unknown = _score_among(classifier, val_set)
        except Exception as err:  # a figure to compare with, never a reason to stop the run
            log.debug("could not score %s before training: %s", model, err)
            return best
        among = "" if list(classifier.classes) == list(val_set.classes) else (
            f", choosing among the run's classes it knows" + (f" ({', '.join(unknown)} new to it)" if unknown else ""))
        log.info("before training, %s scores %.4f on the %d validation faces%s", what, accuracy, len(val_set), among)
        if best[0] is None or accuracy > best[0]:
            best = (accuracy, what)
    return best


def _score_among(classifier, val_set) -> tuple[float, list[str]]:
    """The classifier's accuracy on `val_set` answering only with the set's classes it knows, and the
    set's classes it does not know."""
    known = [name for name in val_set.classes if name in classifier.classes]
    if not known:
        raise ValueError("the model knows none of the run's classes")
    columns = [list(classifier.classes).index(name) for name in known]
    answers = classifier.predict_proba(val_set.images)[:, columns].argmax(axis=1)
    predicted = np.array([list(val_set.classes).index(name) for name in known])[answers]  # the run's class indices
    return float(np.mean(predicted == val_set.labels)), [name for name in val_set.classes if name not in known]


def _warn_of_exports(run: Path) -> None:
    exports = sorted(path.name for path in run.glob("*.onnx"))
    if exports:
        log.warning("%s holds exports of the model as it was before this resume (%s): export again, with "
                    "--overwrite, once the run ends", run, ", ".join(exports))


def _say_what_is_kept(run: Path, kept: list[str]) -> None:
    if kept:
        log.warning("kept what ferkit did not write in %s: %s; anything made from the replaced model is out of date",
                    run, ", ".join(kept))


def _hold_new_run_folder(run: Path, overwrite: bool) -> None:
    """The run folder made and locked (a no-op for one held from the start), then checked again: another
    `ferkit train` of it may have begun since the first check, minutes of loading ago."""
    run.mkdir(parents=True, exist_ok=True)
    hold_run_folder(run)
    check_run_folder(run, resume=False, overwrite=overwrite)


def _check_and_load(config: TrainConfig, run: Path, resume: bool, overwrite: bool, verbose: int, topology):
    """Everything checked that can be before training starts; the training and validation faces. `config`
    gains the data's classes (and an `init` model's network)."""
    check_run_folder(run, resume=resume, overwrite=overwrite)
    if not resume:
        for data in (config.data, config.val):
            check_out_outside_data(run, data, "the run's files")
        if not run.exists():
            check_creatable(run, "run folder")  # now, not after the data has loaded
    if resume and (run / "config.json").exists():
        _check_resumes_its_own_run(config, run)
        _check_has_its_checkpoint(run)
        _check_asks_for_no_fewer_epochs(config, run)
    if not resume:
        config.check_every_setting_applies()
    if config.init and not resume:
        adopt_init_model(config)
    check_fine_tuning(config)
    if not resume:
        check_weights(config.model, config.weights)
        _warn_of_a_random_frozen_backbone(config)
    if config.teacher:
        check_teacher(config.teacher)
        if resume:
            _check_same_teacher(config.teacher, run)
    if overwrite and not resume:
        _check_not_inside_the_run(config, run)
    train_set, val_set = load_train_val(config, get_model_spec(config.model).input_size, progress=verbose > 0)
    if resume:
        check_same_faces(run, train_set, val_set, digests=_reads_every_face(train_set, topology), split=not config.val)
    config.classes = list(train_set.classes)
    return train_set, val_set


def _warn_of_a_random_frozen_backbone(config: TrainConfig) -> None:
    """A transfer network whose backbone starts random and is frozen gives its head near-constant features:
    it answers one class for every face (the study's transfer-random entry measures just that)."""
    if config.weights == "none" and not config.init and get_model_spec(config.model).pretrained:
        unfrozen = f"; --fine-tune {config.fine_tune} unfreezes only its last layers, later" if config.fine_tune else ""
        log.warning("--weights none: %s's backbone starts from random weights and is frozen%s, so the head learns from "
                    "near-constant features (expect one class for every face); train a network of ferkit's own "
                    "(ferkit models) to learn from scratch", config.model, unfrozen)


def _check_asks_for_no_fewer_epochs(config: TrainConfig, run: Path) -> None:
    """Resuming with fewer epochs than the run has done is refused (before the data loads): it would train
    nothing and leave the run as it was. As many: the run is done, and says so."""
    done = RunState.load(run).epochs_done if (run / "state.json").exists() else 0
    if done > config.total_epochs:
        option = "--fine-tune-epochs" if config.fine_tune and done >= config.epochs else "--epochs"
        raise FerkitError(f"{run} has {done} epochs done, more than the {config.total_epochs} asked for; pass a larger "
                          f"{option} to train on")


def _check_has_its_checkpoint(run: Path) -> None:
    """A run with epochs done goes on from its checkpoint; without one, it would start again from
    nothing and write over its records, so it is refused."""
    done = RunState.load(run).epochs_done if (run / "state.json").exists() else 0
    if done and not has_checkpoint(run):
        start = next(((what, run / name) for what, name in (("last", "last.keras"), ("best", "best.keras"))
                      if (run / name).exists()), None)
        advice = f"start a new run from its {start[0]} model (--init {start[1]} --out NEW_FOLDER)" if start else \
            "start it again in a new folder"
        raise FerkitError(f"cannot resume {run}: it has {done} epoch(s) done but its checkpoint ({BACKUP}/) is gone, "
                          f"so it cannot go on where it stopped; {advice}")


def check_same_faces(run: Path, train_set, val_set, *, digests: bool = True, reused: bool = False, split: bool = False) -> None:
    """A resumed run goes on with the faces it began with (--data and --val say where they are now, not
    which): refused when the faces per class differ from those its datasets.json records; warned of when
    only their pixels do (another version of an image decoder changes a few). A finished run `reused` as
    it is (by a study) is refused in both cases: its results would be said of faces it never saw.
    `split`: the validation faces were split off the data (no --val), which is compared whole first."""
    try:
        recorded = json.loads((run / "datasets.json").read_text())
    except (OSError, ValueError):
        return  # a run stopped before it was recorded
    advice = "give the study the data its runs were trained with, or another --out" if reused else \
        "resume it with its own data"
    if split and {"train", "val"} <= recorded.keys():  # the data given, whole: its own counts, not a new split's
        given, was = (whole_counts(train_set.class_counts(), val_set.class_counts()),
                      whole_counts(recorded["train"], recorded["val"]))
        if given != was:
            raise FerkitError(f"the data given (--data) holds other faces than {run} was trained with (faces per class "
                              f"{given}, the run recorded {was}); {advice}")
    for name, faces, digest in (("train", train_set, TRAIN_DIGEST), ("val", val_set, HELD_OUT_DIGEST)):
        option = "--data" if name == "train" else "--val"
        if name in recorded and recorded[name] != faces.class_counts():
            raise FerkitError(f"the {name} data given ({option}) holds other faces than {run} was trained with (faces "
                              f"per class {faces.class_counts()}, the run recorded {recorded[name]}); {advice}")
        if digests and digest in recorded and recorded[digest] != faces_digest(faces.images):
            if reused:
                raise FerkitError(f"the {name} data given ({option}) holds other faces than {run} was trained with (as "
                                  f"many per class, other pixels); {advice}")
            log.warning("the %s data given has as many faces per class as %s recorded, but other pixels: files "
                        "replaced or renamed since, or decoded by another version of an image library; training "
                        "goes on with these", name, run)


def _check_same_teacher(teacher: str, run: Path) -> None:
    """A resumed run distils from the teacher it began with: a FerkitError where the file given (moved, perhaps)
    is another (another model, or the teacher's run trained on since)."""
    recorded = recorded_teacher(run)
    if recorded and recorded != teacher_digest(teacher):
        raise FerkitError(f"the teacher given ({teacher_file(teacher)}) is not the one {run} began to distil from (another "
                          "file); give it that teacher, or start a new run")


def _check_not_inside_the_run(config: TrainConfig, run: Path) -> None:
    """A FerkitError where --teacher or --init lies in the run folder that --overwrite is about to clear."""
    from ferkit.runtime import is_shipped_model_name, resolve_model_path

    for option, given in (("--teacher", config.teacher), ("--init", config.init)):
        if given and not is_shipped_model_name(given):
            path = teacher_file(given) if option == "--teacher" else resolve_model_path(given)
            if Path(os.path.realpath(path)).is_relative_to(os.path.realpath(run)):
                raise FerkitError(f"{option} {given} lies in {run}, which --overwrite clears: copy it elsewhere first")


def _reads_every_face(train_set, topology) -> bool:
    """Whether this process can read every training face (in a data-parallel job on a packed dataset, another
    machine may hold the shards of the other processes): only then are the faces' digests taken."""
    return faces_this_process_reads(train_set, topology) is train_set


def _start_run_folder(run: Path, config: TrainConfig, state: RunState, train_set, val_set, topology, *,
                      resumed: bool) -> None:
    """The run folder as training (re)starts: its config (a resume, and what it changed, noted in resumes.csv),
    its history cut back to the epochs kept, status running."""
    recorded = TrainConfig.load(run / "config.json") if resumed else None
    earlier_processes = _processes_of(run)
    save_run_config(run, config, train_set, val_set, digests=_reads_every_face(train_set, topology),
                    teacher=teacher_digest(config.teacher) if config.teacher else None)
    rewrite_history(run / "history.csv", state.epochs_done)
    if recorded is not None:  # once the run folder is known to be good
        _record_resume(run, recorded, config, state.epochs_done, topology, earlier_processes)
    if topology.coordinator and topology.is_chief:
        topology.save(run / "topology.json", device_names())
    elif not topology.coordinator and (run / "topology.json").exists():
        log.warning("%s was trained by a job of several processes; it goes on as one (its batches now split over "
                    "this process's devices alone)", run)
        (run / "topology.json").unlink()
    state.status = "running"
    state.save(run)


def _record_resume(run: Path, recorded: TrainConfig, config: TrainConfig, epochs_done: int, topology,
                   earlier: int | None) -> None:
    changed = record_resume(run, recorded, config, epochs_done, topology.num_processes)
    # how the arithmetic or the saving changed (not the epochs asked for, nor where the run's files now are)
    settings = [line for line in changed if line.split(":")[0] in ("precision", "save_period")]
    if settings:
        log.info("resuming with other settings than before (recorded in %s): %s", run / RESUMES, "; ".join(settings))
    if topology.coordinator and earlier not in (None, topology.num_processes):
        log.warning("%s was trained by a job of %d processes; it goes on in %d: the same batch size, split %d ways, "
                    "and the faces reach it in another order", run, earlier, topology.num_processes, topology.num_processes)


def _processes_of(run: Path) -> int | None:
    """The processes of the job that last trained the run, from its topology.json (None: one, or unreadable)."""
    try:
        return int(json.loads((run / "topology.json").read_text())["num_processes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fit_phases(keras, model, config: TrainConfig, fit: dict, record, callbacks, state: RunState, size: int, stop,
                run: Path) -> None:
    """The main phase, then fine-tuning's (backbone unfrozen) if the config asks for it, each from where the
    run stopped. `record(backup)`: the callbacks that record the run, backing up into that folder."""
    if state.epochs_done < config.epochs:
        phase = [*record(BACKUP, _schedule_callbacks(config, run)), *(callbacks or [])]
        _fit(keras, model, config, fit, phase, size, epochs=config.epochs, initial_epoch=state.epochs_done)
    if config.fine_tune and state.epochs_done < config.total_epochs and not stop.stopping:
        if not resumes_unfrozen(run, state.epochs_done, config):
            prepare_fine_tuning(keras, model, config, size)
        phase = [*record(FINE_TUNE_BACKUP), *(callbacks or [])]
        model.fit(epochs=config.total_epochs, initial_epoch=state.epochs_done, callbacks=phase, **fit)


def _diverged_message(run: Path, epoch: int, epochs_done: int) -> str:
    kept = f"{run} keeps the {epochs_done} epochs before it" if epochs_done else f"{run} holds no epoch"
    return (f"training diverged: the loss became NaN or infinite in epoch {epoch}, which is dropped; {kept}. "
            "Train again with a lower --lr (or --mixup, --weight-decay)")


def _mark_interrupted(run: Path, state: RunState) -> None:
    state.status = "interrupted"
    if (run / "config.json").exists():
        state.save(run)


def _interrupted_message(run: Path, epochs_done: int, total: int, topology: Topology) -> str:
    done = (f"interrupted after {epochs_done} of {total} epochs (the epoch under way is dropped); {run} is usable"
            if epochs_done else f"interrupted before the first of {total} epochs ended")
    local = os.environ.get(LOCAL_PROCESSES)
    if local:
        return f"{done}, continue with: ferkit train --resume {run} --local-processes {local}"
    if topology.coordinator:
        return (f"{done}, continue with: ferkit train --resume {run} and the same --coordinator, --num-processes and "
                "--process-id in each process")
    return f"{done}, continue with: ferkit train --resume {run}"


def _new_training_model(keras, config: TrainConfig, size: int):
    base = init_model(keras, config.init, config.classes, config.model) if config.init else None
    return build_training_model(keras, config, len(config.classes), size, base=base)


def _run_callbacks(keras, run: Path, config: TrainConfig, state: RunState, model, train_set, stop, *,
                   val_faces: int, padded_val_faces: int):
    """A function of the phase's backup folder (and its schedule's callbacks) that gives the callbacks
    recording the run."""
    from ferkit.callbacks import AveragedWeightsValidation, UnpaddedValidation, run_callbacks

    spec = get_model_spec(config.model)
    network = network_of(model, config)
    metadata = network_metadata(config.model, config.classes)
    # a separate network receives what is saved: float32 weights of a mixed-precision one, the averages, or
    # the weights alone of a network compiled itself (without augmentation layers), whose file would
    # otherwise hold the optimizer's state too (3x the size with Adam); a pretrained backbone's file keeps
    # which of its layers fine-tuning unfroze, so it is saved as it trains
    separate = config.precision != "float32" or config.ema or (network is model and not spec.pretrained)
    saved_model = float32_twin(keras, config.model, len(config.classes)) if separate else network
    averaged = None
    if config.ema:  # validation scores the averaged weights, and RunRecord saves them
        picked = np.random.default_rng(config.seed).permutation(len(train_set))[:BATCH_NORM_FACES]
        averaged = AveragedWeightsValidation(network, faces_to_batch(train_set.images[picked], spec.channels))
    data_parallel = keras.distribution.distribution() is not None  # compiled with a weighted accuracy (compile_model)
    unpadded = UnpaddedValidation(val_faces, padded_val_faces) if data_parallel else None
    return lambda backup, schedule=(): run_callbacks(run, state, network, metadata, backup=run / backup, stop=stop,
                                                     saved_model=saved_model, averaged=averaged, unpadded=unpadded,
                                                     save_period=config.save_period, schedule=schedule)


def _schedule_callbacks(config: TrainConfig, run: Path) -> list:
    """The plateau schedule, which goes on from the run's history (cut back to the epochs done)."""
    if config.lr_schedule == "plateau":
        from ferkit.callbacks import PlateauSchedule

        return [PlateauSchedule(config.lr_patience, read_history(run / "history.csv"))]
    return []


def _fit(keras, model, config: TrainConfig, fit: dict, callbacks: list, size: int, *, epochs: int, initial_epoch: int) -> None:
    """The main phase. With a frozen backbone and cached features, the backbone's features are computed
    once and each epoch trains the head alone on them (its checkpoints hold the head; the saved models
    are the whole network)."""
    if not trains_on_cached_features(config):
        model.fit(epochs=epochs, initial_epoch=initial_epoch, callbacks=callbacks, **fit)
        return
    from ferkit.callbacks import StopOnSignal

    extractor, head = feature_head(keras, model, config, size)
    val_x, val_y = fit["validation_data"]
    log.info("the frozen backbone's features of %d training and %d validation faces, computed once", len(fit["x"]), len(val_x))
    stops = [callback for callback in callbacks if isinstance(callback, StopOnSignal)]  # Ctrl-C and kill stop it
    features = []
    for faces in (fit["x"], val_x):
        features.append(extractor.predict(faces, batch_size=256, verbose=fit.get("verbose", 0), callbacks=stops))
        if any(stop.stopping for stop in stops):
            raise KeyboardInterrupt
    train_features, val_features = features
    head.fit(**{**fit, "x": train_features, "validation_data": (val_features, val_y)}, epochs=epochs,
             initial_epoch=initial_epoch, callbacks=callbacks)


def check_distributable(config: TrainConfig, num_processes: int) -> None:
    """What multi-process training refuses, checked before any process loads the data."""
    if trains_on_cached_features(config):
        raise FerkitError("multi-process training does not support cached features yet (pass --no-cache-features)")
    if config.batch_size % num_processes:
        raise FerkitError(f"--batch-size {config.batch_size} must be a multiple of the number of processes ({num_processes}): "
                          "each takes an equal part of every batch")


BATCH_NORM_FACES = 2048  # un-augmented training faces that measure the averaged weights' batch-norm statistics
