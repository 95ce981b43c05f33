"""Screenshots of `ferkit serve`'s page for the README: a photo analysed, and the webcam mode with a
camera that plays a photo. Needs ferkit[serve], Playwright and a Chromium (Debian: apt-get install chromium).

    python tools/serve_screenshots.py --photo examples/people.jpg --out docs/
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_y4m(photo: Path, path: Path, *, size=(640, 360), frames: int = 10) -> Path:
    """A raw YUV 4:2:0 video of the photo, still: what Chromium's fake camera plays in a loop (also the
    browser tests' camera)."""
    width, height = size
    ycbcr = np.asarray(Image.open(photo).convert("RGB").resize(size).convert("YCbCr"))
    y = ycbcr[:, :, 0]
    cb, cr = (ycbcr[:, :, i].reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3)).astype(np.uint8) for i in (1, 2))
    frame = b"FRAME\n" + y.tobytes() + cb.tobytes() + cr.tobytes()
    path.write_bytes(f"YUV4MPEG2 W{width} H{height} F10:1 Ip A1:1 C420jpeg\n".encode() + frame * frames)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photo", type=Path, default=ROOT / "examples" / "people.jpg")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    try:
        import fastapi  # noqa: F401 - `ferkit serve` needs it, in the server started below
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        parser.error(f"needs ferkit[serve] and Playwright (pip install 'ferkit[serve]' playwright): {err}")
    if not Path(args.chromium).is_file():
        parser.error(f"no Chromium at {args.chromium} (Debian: apt-get install chromium), or give --chromium PATH")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "ferkit.cli", "serve", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if server.poll() is not None:
                raise SystemExit(f"error: ferkit serve ended at its start (exit {server.returncode})")
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        with tempfile.TemporaryDirectory() as folder, sync_playwright() as playwright:
            camera = write_y4m(args.photo, Path(folder) / "camera.y4m")
            browser = playwright.chromium.launch(
                executable_path=args.chromium, headless=True,
                args=["--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                      f"--use-file-for-fake-video-capture={camera}"])
            page = browser.new_page(viewport={"width": 1100, "height": 820})
            page.goto(url)
            page.set_input_files("#photo-input", str(args.photo))
            page.wait_for_selector("#faces .face", timeout=30_000)
            page.screenshot(path=str(args.out / "serve-photo.png"), full_page=True)
            page.click("button[data-tab=webcam]")
            page.click("#webcam-start")
            page.wait_for_selector("#webcam-faces .face", timeout=60_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(args.out / "serve-webcam.png"), full_page=True)
            browser.close()
        for name in ("serve-photo.png", "serve-webcam.png"):  # a palette keeps them small for the README
            shot = Image.open(args.out / name).convert("RGB")
            shot.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out / name, optimize=True)
        print(f"wrote {args.out / 'serve-photo.png'} and {args.out / 'serve-webcam.png'}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
