"""Time each explorer page until it is usable, in a real headless Chromium, and save its screenshot.

Starts `streamlit run app/streamlit_app.py <runs>` as `saewb app` does, opens each page by its address with the
demo run selected, and waits for what a person needs on that page (the Runs table, the Feature page's highlighted
contexts, the Live page's shading, the Steering page's finished default sweep, the Circuits graph). Each page is
timed twice: cold (its first visit after the server started, loading the model where the page needs it) and warm
(a second visit). Screenshots of the warm visits go to docs/img/ for the README.

    python -m bench.app_pages [--runs runs] [--run demo] [--latent 657]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 600_000  # a cold Steering page loads SmolLM2 and generates on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(runs: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "streamlit_app.py"), "--server.headless",
         "true", "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
         "--", str(runs)], cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"streamlit did not start; its log is {log}")


def visit(page, url: str, name: str, latent: int, run: str) -> float:
    """Open page `name` and wait until it is usable; seconds from the request to that."""
    from playwright.sync_api import expect

    started = time.perf_counter()
    page.goto(f"{url}/{name}?run={run}&latent={latent}", timeout=WAIT_MS)
    if name == "runs":
        expect(page.get_by_text("run(s) found")).to_be_visible(timeout=WAIT_MS)
        expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=WAIT_MS)
    elif name == "feature":
        expect(page.locator("span.tok-on").first).to_be_visible(timeout=WAIT_MS)
    elif name == "live":
        box = page.get_by_label("Text", exact=True)
        box.fill("Emma Woodhouse, handsome, clever, and rich, had lived nearly twenty-one years in the world.",
                 timeout=WAIT_MS)
        box.press("Control+Enter", timeout=WAIT_MS)
        expect(page.get_by_text("Latents firing most on this text")).to_be_visible(timeout=WAIT_MS)
    elif name == "steering":
        page.get_by_role("button", name="Steer", exact=True).click(timeout=WAIT_MS)
        expect(page.get_by_text("Continuations")).to_be_visible(timeout=WAIT_MS)
    elif name == "circuits":  # a collapsed panel's figure (the patch-free one) comes first in the page but is hidden
        expect(page.locator(".js-plotly-plot:visible").first).to_be_visible(timeout=WAIT_MS)
    page.wait_for_timeout(1500)  # let the last figures draw before the screenshot
    return time.perf_counter() - started - 1.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="the folder `saewb app` serves")
    parser.add_argument("--run", default="demo", help="the run shown (its folder name under --runs)")
    parser.add_argument("--latent", type=int, default=657, help="the latent the Feature and Steering pages show")
    parser.add_argument("--pages", default="runs,feature,live,steering,circuits",
                        help="comma-separated; PAGE:NAME also opens a tab or an expander of the page and pictures it "
                             "(e.g. feature:Heads, 'circuits:Patch-free circuit')")
    parser.add_argument("--images", type=Path, default=ROOT / "docs" / "img", help="where the screenshots go")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "app_pages.json",
                        help="the timings (pass another file for runs other than the demo)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    args.images.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    proc, url = start_server(args.runs, Path(tempfile.gettempdir()) / "saewb-app-pages.log")
    timings = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, timeout=WAIT_MS, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(WAIT_MS)
            for spec in args.pages.split(","):
                name, _, tab = spec.partition(":")  # "feature:Heads": the Feature page's Heads tab
                cold = visit(page, url, name, args.latent, args.run)
                warm = visit(page, url, name, args.latent, args.run)
                image = args.images / (f"{name}-{tab.lower().split()[0]}.png" if tab else f"{name}.png")
                shot = page
                if tab and page.get_by_role("tab", name=tab).count():
                    page.get_by_role("tab", name=tab).click(timeout=WAIT_MS)
                elif tab:  # an expander: open it and picture only it
                    shot = page.locator("details", has=page.locator("summary", has_text=tab)).first
                    if not shot.count():
                        raise SystemExit(f"The {name} page of run {args.run!r} has no tab or expander named {tab!r}: "
                                         "check the name as the page shows it (e.g. feature:Heads).")
                    shot.locator("summary").click(timeout=WAIT_MS)
                if tab:
                    page.locator(".js-plotly-plot:visible").first.wait_for(timeout=WAIT_MS)
                    page.wait_for_timeout(1500)
                shot.screenshot(path=str(image), timeout=WAIT_MS, **({"full_page": True} if shot is page else {}))
                timings[spec] = {"cold_s": round(cold, 1), "warm_s": round(warm, 1)}
                print(f"{spec}: usable after {cold:.1f} s cold, {warm:.1f} s warm", flush=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    result = {"benchmark": "app_pages", "run": args.run, "latent": args.latent, "pages": timings,
              "usable_means": "Runs: table and a curve; Feature: highlighted contexts; Live: a text shaded; "
                              "Steering: the default sweep finished; Circuits: the graph drawn",
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "machine": describe_machine("cpu")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
