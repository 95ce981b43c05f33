"""Average the weights of several checkpoints of one network into one model (stochastic weight
averaging), its batch-norm statistics measured afresh on training faces, e.g. the packs a long run left
in the repository's history with its last model:

    python tools/average_checkpoints.py ~/ferkit-runs/ferkit-net-l-v1 packs/epoch-92 packs/epoch-120 \\
        --calibration ../shared/data/fer2013/train --out ferkit-net-l-averaged.keras

Each checkpoint is a .keras file, a run folder (its best model, else its last) or a packed run
(tools/pack_run.py). See ferkit.averaging.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ferkit.errors import FerkitError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="two or more checkpoints of one network")
    parser.add_argument("--out", type=Path, required=True, help="the averaged model (.keras)")
    parser.add_argument("--calibration", help="training faces to measure the batch-norm statistics on")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args()
    try:
        from ferkit.averaging import average_checkpoints

        out = average_checkpoints(args.checkpoints, args.out, calibration=args.calibration, overwrite=args.overwrite)
    except FerkitError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {out}: the mean of {len(args.checkpoints)} checkpoints")


if __name__ == "__main__":
    main()
