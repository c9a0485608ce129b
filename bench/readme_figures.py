"""Render plotly figures (the JSON files `saewb eval` and the analyses write) to PNG for the README, in the same
headless Chromium the app tests use (no kaleido needed; plotly.js comes inlined from the plotly package).

    python -m bench.readme_figures runs/demo/eval/figures/zf.json docs/img/zf.png [FIGURE.json OUT.png ...]
"""
import argparse
import tempfile
from pathlib import Path

import plotly.io

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 120_000


def render(pairs: list[tuple[Path, Path]], width: int = 900, height: int = 520) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p, tempfile.TemporaryDirectory() as tmp:
        browser = p.chromium.launch(executable_path=CHROMIUM, timeout=WAIT_MS,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": width, "height": height})
        for source, target in pairs:
            figure = plotly.io.from_json(Path(source).read_text())
            figure.update_layout(width=width, height=height)
            html = Path(tmp) / "figure.html"
            figure.write_html(html, include_plotlyjs=True, full_html=True, config={"displayModeBar": False})
            page.goto(html.as_uri(), timeout=WAIT_MS)
            page.locator(".js-plotly-plot").first.wait_for(timeout=WAIT_MS)
            target.parent.mkdir(parents=True, exist_ok=True)
            page.locator(".js-plotly-plot").first.screenshot(path=str(target), timeout=WAIT_MS)
            print(f"{source} -> {target}")
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", nargs="+", type=Path, help="FIGURE.json OUT.png, repeated")
    parser.add_argument("--width", type=int, default=900)
    parser.add_argument("--height", type=int, default=520)
    args = parser.parse_args()
    if len(args.pairs) % 2:
        parser.error("give the figures as pairs: FIGURE.json OUT.png")
    missing = [str(p) for p in args.pairs[::2] if not p.is_file()]
    if missing:
        parser.error(f"no figure file {', '.join(missing)}: pass the plotly JSON that `saewb eval` writes "
                     "(e.g. runs/<run>/eval/figures/zf.json)")
    render(list(zip(args.pairs[::2], args.pairs[1::2])), args.width, args.height)


if __name__ == "__main__":
    main()
