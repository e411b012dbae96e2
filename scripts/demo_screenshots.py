"""Screenshots of the demo for the README: its two tabs, full page, in headless Chromium.

    python scripts/demo_screenshots.py [--out docs] [--width 1400] [--height 900]

The demo runs in this process on the runs in ``runs/`` and the embedded bases, as
``python app/app.py`` shows them; the Generate tab is drawn with the default prompt, with the
optional extras' section opened where the page offers it. Needs Debian's Chromium at
``/usr/bin/chromium`` (Playwright drives it; no browser download).
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHROMIUM = Path("/usr/bin/chromium")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="folder for the two PNG files")
    parser.add_argument("--width", type=int, default=1400, help="browser window width in px")
    parser.add_argument("--height", type=int, default=900, help="browser window height in px")
    return parser.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(args: argparse.Namespace) -> None:
    from playwright.sync_api import sync_playwright

    import app.app as demo_app

    if not CHROMIUM.exists():
        raise SystemExit(f"no Chromium at {CHROMIUM}: .ci/install_chromium installs Debian's")
    runs = demo_app.found_runs()
    if not runs:
        raise SystemExit(f"no runs in {demo_app.RUNS_DIR}: run the README's quick start first")
    demo = demo_app.build_app()
    port = _free_port()
    demo_app.launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
            label = demo_app.run_label(runs[-1])  # the page-load scan has drawn the reports
            page.wait_for_function(
                "l => (document.querySelector('#comparison')?.innerText || '').includes(l)",
                arg=label,
                timeout=120_000,
            )
            if page.locator("#extras").is_visible():
                page.locator("#extras").get_by_text("Optional extras").click()
                page.locator("#train_extras").wait_for(timeout=10_000)
            page.locator("#generate").click()
            page.get_by_text("models with the same seeds").wait_for(timeout=300_000)
            page.screenshot(path=str(args.out / "demo_generate.png"), full_page=True)
            height = page.evaluate("document.documentElement.scrollHeight")
            page.get_by_role("tab", name="Training and merge").click()
            page.locator("#grids img").wait_for(timeout=60_000)
            page.screenshot(path=str(args.out / "demo_training.png"), full_page=True)
            print(f"wrote {args.out}/demo_generate.png ({height} px tall) and demo_training.png")
            browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main(parse_args())
