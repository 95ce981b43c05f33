"""Pack a run in flight into a small folder that `ferkit train --resume` continues, e.g. to keep a long
run's progress in the repository between working stretches:

    python tools/pack_run.py ~/ferkit-runs/ferkit-net-l-v1 training/ferkit-net-l-v1

The folder gets the run's config, history, state and curves, checkpoint.npz: the network's weights in
float16, without the optimizer's state (see ferkit.checkpoints.save_compact_checkpoint), and best.npz: the
best model's weights, the same way, unless the best model is the last epoch's, which checkpoint.npz then
holds. A best model unchanged since the last pack is written byte for byte as before, so git keeps it
once. To continue:

    cp -r training/ferkit-net-l-v1 ~/ferkit-runs/ && ferkit train --resume ~/ferkit-runs/ferkit-net-l-v1
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from ferkit.checkpoints import COMPACT_BEST, COMPACT_CHECKPOINT, COMPACT_FILES, save_compact_checkpoint
from ferkit.config import TrainConfig
from ferkit.errors import FerkitError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the run folder")
    parser.add_argument("out", type=Path, help="the packed folder; an earlier pack of the same run there is replaced")
    args = parser.parse_args()
    try:
        _check_replaceable(args.run, args.out)
        with tempfile.TemporaryDirectory(dir=args.out.parent if args.out.parent.exists() else None) as scratch:
            staged = save_compact_checkpoint(args.run, Path(scratch) / "packed")
            for name in (*COMPACT_FILES, COMPACT_CHECKPOINT, COMPACT_BEST):  # replace only the files a pack writes
                (args.out / name).unlink(missing_ok=True)
            args.out.mkdir(parents=True, exist_ok=True)
            for item in staged.iterdir():
                shutil.move(str(item), args.out / item.name)
        config = TrainConfig.load(args.out / "config.json")
        config.out = str(args.out)  # staged elsewhere first: name the folder it ends up in
        config.save(args.out / "config.json")
    except FerkitError as err:
        sys.exit(f"error: {err}")
    size = sum(p.stat().st_size for p in args.out.iterdir()) / 1e6
    print(f"packed {args.run} into {args.out} ({size:.1f} MB)")


def _check_replaceable(run: Path, out: Path) -> None:
    """Refuse to write where anything but an earlier pack of this same run is."""
    if out.exists() and not out.is_dir():
        raise FerkitError(f"{out} is a file; give a folder for the packed run")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / COMPACT_CHECKPOINT).exists():
        raise FerkitError(f"{out} exists and is not a packed run; refusing to replace it")
    if (out / "config.json").exists() and (run / "config.json").exists():
        changed = TrainConfig.load(run / "config.json").settings_changed_from(TrainConfig.load(out / "config.json"))
        if changed:
            raise FerkitError(f"{out} holds the pack of another run (other {', '.join(changed)}); refusing to replace it")
    packed, history = _history_lines(out), _history_lines(run)
    if packed[:len(history)] != history[:len(packed)] or len(packed) > len(history):
        raise FerkitError(f"{out} holds the pack of another run (its history.csv is not the start of {run}'s); "
                          "refusing to replace it")


def _history_lines(folder: Path) -> list[str]:
    path = folder / "history.csv"
    return path.read_text().splitlines() if path.is_file() else []


if __name__ == "__main__":
    main()
