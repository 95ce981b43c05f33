"""A model's validation accuracy on the faces it may have learnt by heart and on the others: validation
faces identical, pixel for pixel, to training faces (FER2013's PublicTest has 280 of Training's) are
scored apart from the rest, one view each.

    python tools/seen_in_training.py default --data ../shared/data/fer2013/train --val ../shared/data/fer2013/val
"""

from __future__ import annotations

import argparse
import sys

from ferkit.data import load_dataset
from ferkit.errors import FerkitError
from ferkit.runtime import load_classifier
from ferkit.training_data import faces_seen_in_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a shipped model's name, a run folder or a model file")
    parser.add_argument("--data", required=True, help="the training data the model learnt from")
    parser.add_argument("--val", required=True, help="the validation data")
    args = parser.parse_args()
    classifier = load_classifier(args.model).with_tta("none")
    options = {"classes": list(classifier.classes), "image_size": tuple(classifier.input_size)}
    data, val = load_dataset(args.data, **options), load_dataset(args.val, **options)
    seen = faces_seen_in_training(data, val) >= 0
    right = classifier.predict_proba(val.images, batch_size=256).argmax(axis=1) == val.labels
    print(f"{args.model}, val accuracy, one view, all {len(val)} faces: {right.mean():.4f}")
    for name, part in (("identical to training faces", seen), ("not among the training faces", ~seen)):
        score = f"{right[part].mean():.4f}" if part.any() else "-"
        print(f"  {part.sum():5d} faces {name}: {score}")


if __name__ == "__main__":
    try:
        main()
    except FerkitError as err:
        sys.exit(f"error: {err}")
