"""Screenshots of the TensorBoard dashboard over a run's real logs, taken with headless Chromium (not part of CI).

    python docs/screenshots.py LOGDIR            # writes docs/img/*.png, which the README shows
    python docs/screenshots.py LOGDIR --out /tmp/shots --port 6123

Needs Debian's ``chromium`` package (``apt-get install chromium``) and the ``tensorboard`` command. Starts
TensorBoard on localhost over LOGDIR, waits until it serves the run, then has Chromium render each dashboard page
(the custom-scalars page, whose first category is ``llmdbg: health``), and writes ``llmdbg report``'s PNGs of the same
run beside it for a fixed virtual time and saves a PNG.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# File name -> TensorBoard URL fragment. The text and images tabs (alerts, hard examples, the data map) are left out:
# their cards load lazily and stay empty in headless Chromium (TensorBoard 2.21). The same run's `llmdbg report`
# plots (gradient-norm heatmap, data map) are written beside the screenshot instead.
PAGES = {"dashboard_health": "#custom_scalars"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200 and response.read() not in (b"{}", b""):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"TensorBoard did not serve {url} within {timeout:.0f}s")


def screenshot(chromium: str, url: str, path: Path, size: str, budget_ms: int) -> None:
    subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size}",
            f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url,
        ],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
    )


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdir")
    parser.add_argument("--out", default=str(Path(__file__).parent / "img"))
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--size", default="1600,1200", help="window size in pixels (default: %(default)s)")
    parser.add_argument("--budget-ms", type=int, default=15000, help="Chromium's virtual time per page")
    args = parser.parse_args(argv)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    tensorboard = shutil.which("tensorboard") or str(Path(sys.executable).parent / "tensorboard")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port()
    server = subprocess.Popen(
        [tensorboard, "--logdir", args.logdir, "--port", str(port), "--host", "127.0.0.1", "--samples_per_plugin", "text=0,images=0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    written = []
    try:
        base = f"http://127.0.0.1:{port}/"
        wait_for(base + "data/runs")
        for name, fragment in PAGES.items():
            path = out / f"{name}.png"
            screenshot(chromium, base + fragment, path, args.size, args.budget_ms)
            written.append(path)
            print(path)
    finally:
        server.terminate()
        server.wait(timeout=30)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lightning_llmdbg.report import find_runs, load_run, write_plots

    for path in write_plots(load_run(find_runs(args.logdir)[0]), out):
        written.append(path)
        print(path)
    return written


if __name__ == "__main__":
    main()
