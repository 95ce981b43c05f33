"""Images/s of `ferkit predict --engine ray` against plain `ferkit predict`, on the same photos, in one run.

    python benchmarks/ray_predict.py [--photos DIR] [--count 500] [--rounds 2]

Without --photos it writes `--count` photos made from the repository's real photos (examples/ and
tests/data/: flipped, scaled and cropped, so that no two are the same file) into a temporary folder.
Each round times, as whole commands (start-up included), in alternating order:

- `local`: `ferkit predict DIR` (the default engine);
- `ray`: `ferkit predict DIR --engine ray`, which starts a Ray instance of its own;
- `ray-cluster`: the same with `--address` of a cluster started beforehand (`ray start --head`), as on a
  real cluster, where start-up is paid once, not per command;
- `ray-cluster-wN`: the same with `--workers N`, for N in 1, 2, 4, ... up to the cores of this machine.

Prints the median seconds and images/s per variant, and each one's time over `local`'s: the overhead.
It starts a Ray cluster of its own on this machine and stops it with `ray stop`, which stops every Ray
process here: it refuses to run while another Ray cluster runs on this machine.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "examples" / "people.jpg", *sorted((ROOT / "tests" / "data").glob("*.jpg"))]
FERKIT = [sys.executable, "-m", "ferkit.cli"]
SUMMARY = re.compile(r"(\d+) images, (\d+) faces.*?, (\d+) failed")  # predict's last line, either engine
RAY = str(Path(sys.executable).parent / "ray")  # the `ray` command of this environment


def make_photos(folder: Path, count: int) -> Path:
    """`count` different photos from the repository's real ones: each flipped or not, scaled, cropped."""
    folder.mkdir(parents=True, exist_ok=True)
    originals = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in SOURCES]
    for n in range(count):
        photo = originals[n % len(originals)]
        if (n // len(originals)) % 2:
            photo = ImageOps.mirror(photo)
        scale = 0.7 + 0.3 * ((n * 7) % 11) / 10
        photo = photo.resize((max(64, int(photo.width * scale)), max(64, int(photo.height * scale))))
        trim = (n % 5) * 0.02
        box = (int(photo.width * trim), int(photo.height * trim), photo.width, photo.height)
        photo.crop(box).save(folder / f"photo-{n:04d}.jpg", quality=90)
    return folder


def timed(command: list[str]) -> tuple[float, dict[str, int]]:
    """Seconds the command took, and the images, faces and failures its summary line counts."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    counts = SUMMARY.search(result.stdout)
    if result.returncode not in (0, 1) or counts is None:  # 1: some photo failed, counted below
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    images, faces, failed = map(int, counts.groups())
    if failed == images:
        raise SystemExit(f"{' '.join(command)}: every photo failed:\n{result.stderr}")
    return seconds, {"images": images, "faces": faces, "failed": failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, help="a folder of photos (default: made from the repository's)")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="ferkit-ray-bench-") as scratch:
        scratch = Path(scratch)
        photos = args.photos or make_photos(scratch / "photos", args.count)
        if subprocess.run([RAY, "status"], capture_output=True).returncode == 0:
            sys.exit("a Ray cluster already runs on this machine; this benchmark's `ray stop` would stop it too")
        subprocess.run([RAY, "start", "--head", f"--num-cpus={cores}", "--include-dashboard=false"],
                       check=True, capture_output=True)
        try:
            variants = {
                "local": lambda out: [*FERKIT, "predict", str(photos), "--out", out],
                "ray": lambda out: [*FERKIT, "predict", str(photos), "--engine", "ray", "--out", out],
                "ray-cluster": lambda out: [*FERKIT, "predict", str(photos), "--engine", "ray", "--address", "auto",
                                            "--out", out],
            }
            workers = 1
            while workers <= cores:
                variants[f"ray-cluster-w{workers}"] = (lambda n: lambda out: [
                    *FERKIT, "predict", str(photos), "--engine", "ray", "--address", "auto", "--workers", str(n),
                    "--out", out])(workers)
                workers *= 2
            seconds: dict[str, list[float]] = {name: [] for name in variants}
            counted: dict[str, dict[str, int]] = {}
            for r in range(args.rounds):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for name in order:
                    took, counted[name] = timed(variants[name](str(scratch / f"out-{name}-{r}")))
                    seconds[name].append(took)
                    print(f"round {r + 1} {name:16s} {took:7.1f} s  {counted[name]['images']} images, "
                          f"{counted[name]['faces']} faces, {counted[name]['failed']} failed", flush=True)
        finally:
            subprocess.run([RAY, "stop", "--force"], capture_output=True)
        base = statistics.median(seconds["local"])
        local = counted["local"]
        print(f"\n{local['images']} photos ({local['faces']} faces, {local['failed']} failed), {cores} cores, median of "
              f"{args.rounds} rounds (whole commands, start-up included)")
        for name, values in seconds.items():
            median = statistics.median(values)
            analysed = counted[name]["images"] - counted[name]["failed"]
            print(f"{name:16s} {median:7.1f} s  {analysed / median:6.1f} images/s  time / local {median / base:.2f}")
        if cores < 4:
            print(f"scaling past {cores} workers: not measured (this machine has {cores} cores)")


if __name__ == "__main__":
    main()
