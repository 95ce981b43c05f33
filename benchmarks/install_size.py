"""What installing ferkit costs: disk and time, for the plain package and each extra.

    python benchmarks/install_size.py                 # ferkit, ferkit[video], ferkit[evaluate], ferkit[all]
    python benchmarks/install_size.py --extras "" all

Each install goes into a fresh virtual environment (pip upgraded first, outside the timing) from a copy
of this checkout, with pip's cache off, so every figure includes the downloads. Sizes are the whole
environment, pip and setuptools included.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def folder_megabytes(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def measure(extra: str, workdir: Path) -> tuple[float, float]:
    venv = workdir / f"venv-{extra or 'plain'}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--quiet", "--no-cache-dir"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    target = f"{workdir / 'src'}[{extra}]" if extra else str(workdir / "src")
    start = time.perf_counter()
    subprocess.run([*pip, "install", target], check=True)
    seconds = time.perf_counter() - start
    size = folder_megabytes(venv)
    shutil.rmtree(venv)
    return size, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", nargs="*", default=["", "video", "evaluate", "all"],
                        help='extras to measure, one install each ("" is the plain package)')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        for name in tracked:  # the checkout as a clone has it, without .venv, runs or caches
            if (ROOT / name).is_file():
                (workdir / "src" / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, workdir / "src" / name)
        print(f"{'install':<22}{'MB':>8}{'seconds':>10}")
        for extra in args.extras:
            size, seconds = measure(extra, workdir)
            label = f"ferkit[{extra}]" if extra else "ferkit"
            print(f"{label:<22}{size:>8.0f}{seconds:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
