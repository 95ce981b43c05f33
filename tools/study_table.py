"""Print the README's study table (Markdown) from a study's study.json, so the README's figures are the
report's own.

    python tools/study_table.py docs/study/study.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def markdown_table(study: dict) -> str:
    lines = ["| model | network | parameters | val accuracy | published | macro-F1 | train − val gap | epochs | s / epoch | faces / s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in study["entries"]:
        published = "—" if e["published_accuracy"] is None else f"{e['published_accuracy']:.1%}"
        gap = "—" if e["train_val_gap"] is None else f"{e['train_val_gap'] * 100:+.1f} points"
        epochs = "—" if e["epochs"] is None else str(e["epochs"])
        per_epoch = "—" if e["seconds_per_epoch"] is None else f"{e['seconds_per_epoch']:.1f}"
        lines.append(f"| {e['name']}: {e['label']} | {e['model']} | {e['parameters']:,} | {e['accuracy']:.1%} | {published} "
                     f"| {e['macro_f1']:.3f} | {gap} | {epochs} | {per_epoch} | {e['faces_per_second']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_json", type=Path)
    path = parser.parse_args().study_json
    try:
        study = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        parser.error(f"cannot read {path}: {err}")
    if not isinstance(study, dict) or not isinstance(study.get("entries"), list):
        parser.error(f"{path} is not the study.json of `ferkit study` (no entries)")
    print(markdown_table(study))


if __name__ == "__main__":
    main()
