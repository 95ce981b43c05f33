"""Load on `ferkit serve`, on loopback: answered requests/s (and those refused) and p50/p95 latency for
1, 4 and 16 concurrent clients posting one photo, each against the same photo through `ferkit.analyze`
in-process, in one run. Exits 1 where some request was not answered.

    python benchmarks/serve_load.py --photo examples/people.jpg --width 500 --requests 200

The photo is resized to `--width` pixels and sent as a JPEG body. In-process, `ferkit.analyze` decodes
the same JPEG bytes each time (what the server does), one call after another; its calls/s and
latency are the baseline of the ratios.
"""

from __future__ import annotations

import argparse
import http.client
import io
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def jpeg_of(photo: Path, width: int) -> bytes:
    image = Image.open(photo).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def start_server(port: int, concurrency: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "ferkit.cli", "serve", "--port", str(port),
                               "--concurrency", str(concurrency)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/healthz")
            ready = connection.getresponse().status == 200
            connection.close()
            if ready:
                return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not start")


def load(port: int, body: bytes, clients: int, requests: int) -> tuple[float, list[float], Counter]:
    """`requests` posts shared by `clients` threads, each on its own keep-alive connection: answers per
    second (200s only), their latencies, and how many requests got each other status (503: the server
    was full)."""
    latencies: list[float] = []
    refused: Counter = Counter()
    lock = threading.Lock()
    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]

    def client(count: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for _ in range(count):
            started = time.perf_counter()
            connection.request("POST", "/v1/analyze", body=body, headers={"Content-Type": "image/jpeg"})
            response = connection.getresponse()
            response.read()
            with lock:
                if response.status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    refused[response.status] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in per_client]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies) / (time.perf_counter() - started), latencies, refused


def in_process(body: bytes, calls: int) -> tuple[float, list[float]]:
    import ferkit

    ferkit.analyze(Image.open(io.BytesIO(body)))  # load the model and detector first
    latencies = []
    started = time.perf_counter()
    for _ in range(calls):
        begin = time.perf_counter()
        ferkit.analyze(Image.open(io.BytesIO(body)))
        latencies.append(time.perf_counter() - begin)
    return calls / (time.perf_counter() - started), latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photo", type=Path, default=ROOT / "examples" / "people.jpg")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--concurrency", type=int, default=2, help="the server's --concurrency")
    args = parser.parse_args()
    body = jpeg_of(args.photo, args.width)
    import ferkit

    faces = len(ferkit.analyze(Image.open(io.BytesIO(body))))
    print(f"photo: {args.photo.name} at {args.width} px wide, {len(body) / 1024:.0f} kB, {faces} faces")
    base_rate, base = in_process(body, args.requests)
    base_p50, base_p95 = percentile(base, 50) * 1000, percentile(base, 95) * 1000
    print(f"in-process ferkit.analyze: {base_rate:.1f} calls/s, p50 {base_p50:.1f} ms, p95 {base_p95:.1f} ms")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start_server(port, args.concurrency)
    try:
        load(port, body, 2, 10)  # warm-up
        print("clients  answers/s  (x in-process)  p50 ms  (x)  p95 ms  (x)  not answered")
        failed = False
        for clients in (int(c) for c in args.clients.split(",")):
            rate, latencies, refused = load(port, body, clients, args.requests)
            if not latencies:
                print(f"{clients:7d}  no request answered: {dict(refused)}", flush=True)
                failed = True
                continue
            p50, p95 = percentile(latencies, 50) * 1000, percentile(latencies, 95) * 1000
            missed = ", ".join(f"{n} x {status}" for status, n in sorted(refused.items())) or "-"
            print(f"{clients:7d}  {rate:9.1f}  ({rate / base_rate:.2f})  {p50:8.1f}  ({p50 / base_p50:.2f})  "
                  f"{p95:6.1f}  ({p95 / base_p95:.2f})  {missed}", flush=True)
            failed = failed or bool(refused)
        if failed:
            print("some requests were not answered (503: more clients than --concurrency and the server's queue take)")
    finally:
        server.terminate()
        server.wait(timeout=30)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
