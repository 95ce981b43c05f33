"""The training checkpoint of a run folder: what `ferkit train --resume` continues from.

Runs keep it as Keras' BackupAndRestore callback writes it: the training model's weights with the
optimizer's state, and the epoch, in `backup/` (`backup-fine-tune/` for the fine-tuning phase). Two
older forms still resume:

    checkpoint.keras   the whole training model, as runs made by ferkit 0.x before BackupAndRestore kept it
    checkpoint.npz     a packed copy of a run in flight (save_compact_checkpoint): the network's weights in
                       float16, without the optimizer's state

A packed run also keeps its best model's weights (best.npz), which become best.keras again on resuming;
when the best model is the last epoch's, checkpoint.npz holds it, with its metadata, and serves as both.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ferkit._keras import import_keras
from ferkit.config import TrainConfig
from ferkit.errors import FerkitError
from ferkit.runs import RunState
from ferkit.runtime import METADATA_NAME, ModelMetadata, load_keras_model, read_metadata, save_keras_model
from ferkit.training_model import FEATURE_HEAD, build_training_model, feature_head, network_of

log = logging.getLogger("ferkit")

BACKUP = "backup"
FINE_TUNE_BACKUP = "backup-fine-tune"
WHOLE_MODEL_CHECKPOINT = "checkpoint.keras"
COMPACT_CHECKPOINT = "checkpoint.npz"
COMPACT_BEST = "best.npz"  # the weights of a packed run's best.keras, in float16
CHECKPOINTS = (BACKUP, FINE_TUNE_BACKUP, WHOLE_MODEL_CHECKPOINT, COMPACT_CHECKPOINT)
COMPACT_FILES = ("config.json", "datasets.json", "history.csv", "state.json", "curves.png", "resumes.csv")


def backup_weights(folder: Path) -> Path:
    """The weights file of a BackupAndRestore folder (Keras' own name for it)."""
    return folder / "latest.weights.h5"


def backed_up_epochs(run: Path) -> int | None:
    """The epochs done according to the run's newest backup, or None without one."""
    for name in (FINE_TUNE_BACKUP, BACKUP):
        path = run / name / "training_metadata.json"
        if path.exists():
            return int(json.loads(path.read_text())["epoch"])
    return None


def has_checkpoint(run: Path) -> bool:
    return any((run / name).exists() for name in CHECKPOINTS)


def remove_checkpoints(run: Path, names=(*CHECKPOINTS, COMPACT_BEST)) -> None:
    for name in names:
        path = run / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def resume_training_model(keras, run: Path, config: TrainConfig, num_classes: int, train_size: int, epochs_done: int):
    """The training model to continue the run with, holding the weights it stopped at, or about to get
    them: a backup is loaded by BackupAndRestore when `fit` starts, unless its phase is over (then here)."""
    if (run / BACKUP).exists() or (run / FINE_TUNE_BACKUP).exists():
        model = _rebuilt(keras, config, num_classes, train_size)
        # the main phase is over, and fine-tuning has no backup yet: the main phase's weights start it
        if epochs_done >= config.epochs and not (run / FINE_TUNE_BACKUP).exists():
            _load_main_phase_backup(keras, model, run / BACKUP, config, train_size)
        return model
    if (run / WHOLE_MODEL_CHECKPOINT).exists():
        model = load_keras_model(keras, run / WHOLE_MODEL_CHECKPOINT, compile=True)
        if model.name == FEATURE_HEAD:  # stopped in a phase that trained on cached features
            head_weights = model.get_weights()
            model = _rebuilt(keras, config, num_classes, train_size)
            feature_head(keras, model, config, train_size)[1].set_weights(head_weights)
        return model
    if (run / COMPACT_CHECKPOINT).exists():
        model = _rebuilt(keras, config, num_classes, train_size)
        _restore_compact_checkpoint(model, config, run / COMPACT_CHECKPOINT, epochs_done, train_size)
        return model
    raise FerkitError(f"cannot resume: {run} holds no checkpoint ({BACKUP}/ or {WHOLE_MODEL_CHECKPOINT})")


def _rebuilt(keras, config: TrainConfig, num_classes: int, train_size: int):
    """The run's training model, built again to take its checkpoint. A pretrained backbone that trained
    frozen, on cached features, is not in the checkpoint: it comes again from where the run began, its
    --init model (not the --weights its network starts from by default)."""
    from ferkit.models import get_model_spec
    from ferkit.training_model import init_model

    base = None
    if config.init and get_model_spec(config.model).pretrained:
        base = init_model(keras, config.init, config.classes, config.model)
    return build_training_model(keras, config, num_classes, train_size, base=base)


def keeps_its_precision(run: Path) -> bool:
    """Whether resuming `run` loads a whole saved model (a run folder of the older layout), whose layers
    keep the precision they were saved with, rather than rebuilding the network and loading weights."""
    return not (run / BACKUP).exists() and not (run / FINE_TUNE_BACKUP).exists() and (run / WHOLE_MODEL_CHECKPOINT).exists()


def resumes_unfrozen(run: Path, epochs_done: int, config: TrainConfig) -> bool:
    """Whether the model resume_training_model gives is in the fine-tuning phase already, unfrozen and
    compiled for it: only a whole-model checkpoint keeps that."""
    return epochs_done > config.epochs and not (run / BACKUP).exists() and (run / WHOLE_MODEL_CHECKPOINT).exists()


def _load_main_phase_backup(keras, model, folder: Path, config: TrainConfig, train_size: int) -> None:
    from ferkit.training_data import trains_on_cached_features

    target = feature_head(keras, model, config, train_size)[1] if trains_on_cached_features(config) else model
    load_backup(target, folder)


def load_backup(model, folder: Path) -> None:
    """The weights and optimizer state of a BackupAndRestore folder, loaded as that callback loads them."""
    model.optimizer.build(model.trainable_variables)
    model.load_weights(backup_weights(folder))


def save_compact_checkpoint(run: str | Path, out: str | Path) -> Path:
    """A small copy of the run in flight at `run`, in a new folder `out` that `ferkit train --resume`
    continues: its record (config, history, state, curves) and the network's weights in float16.

    The optimizer's state is not kept, which makes the copy a third of the size: on resuming, momentum
    restarts at zero and the weights' moving average at the weights themselves; the learning-rate
    schedule goes on from the right step. Validation, which scores the average, reads lower for the few
    epochs the average takes to settle again (ferkit-net-l, EMA 0.999, epoch 51 of 150: 0.6553 in the
    first epoch after resuming from a pack; 0.6665 for the same epoch where the run went on with its
    full checkpoint).

    The best model's weights are kept beside them, in float16 (best.npz), since the best epoch is often
    not the last. When it is the last, one file serves as both, which halves the pack: checkpoint.npz
    then holds the best model, with its metadata. Without a moving average those are the checkpoint's
    own weights; with one, the run resumes from the average it validated (ferkit-net-l-distilled-v1,
    packed so after epoch 6 of 60: 0.6916 in the first epoch after resuming, 0.6941 where the run went on
    with its full checkpoint). A later pack whose best model
    is still that one writes it as best.npz in the same bytes, which version control keeps once.
    """
    keras = import_keras()
    run, out = Path(run), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FerkitError(f"{out} already exists; choose an empty or new folder")
    config = TrainConfig.load(run / "config.json")
    best = _best_model_to_pack(keras, run)
    if best is not None and _is_last_epoch(best[1], run):
        files = {COMPACT_CHECKPOINT: best}
    else:
        files = {COMPACT_CHECKPOINT: (network_of(_trained_model(keras, run, config), config), None)}
        if best is not None:
            files[COMPACT_BEST] = best
    out.mkdir(parents=True, exist_ok=True)
    for name in COMPACT_FILES:
        if (run / name).exists():
            shutil.copy2(run / name, out / name)
    config.out = str(out)  # the pack is a run folder of its own; where the run lived says nothing here
    config.save(out / "config.json")
    for name, (network, metadata) in files.items():
        save_float16_weights(out / name, network.get_weights(), metadata and asdict(metadata))
    return out


def _best_model_to_pack(keras, run: Path) -> tuple | None:
    """(network, metadata) of the run's best.keras, without where the run lived (which says nothing in
    a pack and would change its bytes), or None when the run has none yet."""
    if not (run / "best.keras").exists():
        return None
    metadata = read_metadata(run / "best.keras")
    metadata.extra.pop("run", None)
    return load_keras_model(keras, run / "best.keras"), metadata


def _is_last_epoch(metadata: ModelMetadata, run: Path) -> bool:
    """Whether a model saved by the run is of the epoch its checkpoint and state.json are at."""
    done = RunState.load(run).epochs_done
    return metadata.extra.get("epoch") == done and backed_up_epochs(run) in (None, done)


def save_float16_weights(path: Path, weights, metadata: dict | None = None) -> None:
    """Weights as np.load reads them (arr_0, arr_1, ...), in float16, compressed, with the model's ferkit
    metadata (METADATA_NAME) if given. The same weights always give the same bytes (no time stamps
    inside), so version control stores a file repacked unchanged once."""
    def entry(name: str) -> zipfile.ZipInfo:
        return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for i, weight in enumerate(weights):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(weight, np.float16), allow_pickle=False)
            archive.writestr(entry(f"arr_{i}.npy"), buffer.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
        if metadata is not None:
            archive.writestr(entry(METADATA_NAME), json.dumps(metadata, sort_keys=True), compress_type=zipfile.ZIP_DEFLATED)


def load_float16_weights(path: Path) -> list:
    """save_float16_weights' weights, in float32."""
    with np.load(path) as stored:
        count = sum(name.startswith("arr_") for name in stored.files)
        return [stored[f"arr_{i}"].astype(np.float32) for i in range(count)]


def restore_packed_best_model(keras, run: Path, config: TrainConfig) -> None:
    """best.keras again from a packed run's best.npz, which it then replaces. A best.keras already there
    (an older copy of the run, say) gives way, with a warning, unless it is the same epoch's."""
    from ferkit.training_model import float32_twin, network_metadata

    packed = run / COMPACT_BEST
    if not packed.exists():  # the best model may be the checkpoint itself, which then carries its metadata
        packed = run / COMPACT_CHECKPOINT
        if not packed.exists() or _packed_metadata(packed) is None:
            return
    metadata = _packed_metadata(packed) or network_metadata(config.model, config.classes)
    metadata.extra = {**metadata.extra, "run": str(run)}
    existing = run / "best.keras"
    if existing.exists():
        existing_epoch = read_metadata(existing).extra.get("epoch")
        if existing_epoch == metadata.extra.get("epoch"):
            _remove_packed_best(packed)
            return
        log.warning("%s holds another best model than the pack's (epoch %s): replaced by the pack's (epoch %s)", run,
                    existing_epoch or "unknown", metadata.extra.get("epoch", "unknown"))
    network = float32_twin(keras, config.model, len(config.classes))
    try:
        network.set_weights(load_float16_weights(packed))
    except ValueError:
        raise FerkitError(f"{packed} does not hold the weights of a {config.model} network") from None
    save_keras_model(network, existing, metadata)
    _remove_packed_best(packed)


def _remove_packed_best(packed: Path) -> None:
    if packed.name == COMPACT_BEST:  # a checkpoint that is also the best model stays, to resume from
        packed.unlink()


def _packed_metadata(path: Path) -> ModelMetadata | None:
    with zipfile.ZipFile(path) as archive:
        if METADATA_NAME not in archive.namelist():
            return None
        return ModelMetadata.from_dict(json.loads(archive.read(METADATA_NAME)))


def _trained_model(keras, run: Path, config: TrainConfig):
    """The training model of the run's checkpoint, with its weights (for packing)."""
    from ferkit.training_data import trains_on_cached_features

    if (run / BACKUP).exists() and not (run / FINE_TUNE_BACKUP).exists() and not trains_on_cached_features(config):
        model = build_training_model(keras, config, len(config.classes), train_size=1)
        load_backup(model, run / BACKUP)
        return model
    if (run / WHOLE_MODEL_CHECKPOINT).exists() and not (run / BACKUP).exists():
        model = load_keras_model(keras, run / WHOLE_MODEL_CHECKPOINT)
        if model.name != FEATURE_HEAD:
            return model
    raise FerkitError(f"{run} holds no checkpoint of its main phase's whole network to pack (only those are packed)")


def _restore_compact_checkpoint(training_model, config: TrainConfig, path: Path, epochs_done: int, train_size: int) -> None:
    """Load save_compact_checkpoint's weights into a freshly compiled training model, with the optimizer
    at the step where the run stopped (so the learning-rate schedule continues)."""
    try:
        network_of(training_model, config).set_weights(load_float16_weights(path))
    except ValueError:
        raise FerkitError(f"{path} does not hold the weights of a {config.model} network") from None
    optimizer = training_model.optimizer
    optimizer.build(training_model.trainable_variables)
    optimizer.iterations.assign(epochs_done * -(-train_size // config.batch_size))
    from ferkit.callbacks import moving_averages

    averages = moving_averages(optimizer)
    for variable in training_model.trainable_variables:
        if id(variable) in averages:
            averages[id(variable)].assign(variable)

