"""Size and speed of `clipmech view`'s site: generation time, and per page the bytes it loads and the
time until it is drawn, in headless Debian Chromium.

    python benchmarks/view_site.py DIR            # a study folder (quickstart / experiment analyse output)
    python benchmarks/view_site.py --committed    # the committed quickstart results in figures/
    ... --shots FOLDER                            # also a full-page screenshot of each page

Prints, side by side in one run: the `clipmech view` command's wall time (a fresh process: Python,
imports and the build) and `build_site` alone; then for the study page, a model page (the first
with circuits) and a node panel on it: the files the page requested (all file://) with their total
size, and the milliseconds from navigation until the page reported itself drawn. Needs chromium,
chromium-driver and selenium (the test extra). Times taken on a shared machine vary with its load.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_view import chromium_driver, full_page_screenshot, requested_urls  # noqa: E402  (the tests' browser set-up)

from clipmech.view.site import build_site  # noqa: E402


def committed_study(root: Path) -> Path:
    """The committed quickstart output (figures/) laid out as the quickstart writes it."""
    study = root / "committed"
    (study / "figures").mkdir(parents=True)
    shutil.copy(REPO / "figures" / "quickstart_results.json", study / "results.json")
    shutil.copy(REPO / "figures" / "quickstart_report.md", study / "report.md")
    for p in (REPO / "figures").glob("*.png"):
        shutil.copy(p, study / "figures" / p.name)
    return study


def measure_page(driver, url: str, ready: str) -> tuple[int, int, float]:
    """(files requested, their bytes, ms from navigation until `ready` holds)."""
    driver.get("about:blank")
    requested_urls(driver)
    driver.get(url)
    deadline = time.time() + 30
    while not driver.execute_script(f"return !!({ready})"):
        if time.time() > deadline:
            raise TimeoutError(f"{url} was not drawn within 30 s")
        time.sleep(0.01)
    ms = driver.execute_script("return performance.now()")
    urls = [u for u in requested_urls(driver) if u.startswith("file://")]
    files = {unquote(urlparse(u).path) for u in urls}
    return len(files), sum(Path(f).stat().st_size for f in files if Path(f).is_file()), ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", nargs="?", help="study folder")
    ap.add_argument("--committed", action="store_true", help="use the committed quickstart results (figures/)")
    ap.add_argument("--shots", type=Path, help="write a full-page screenshot of each page into this folder")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="view-bench-"))
    try:
        study = committed_study(tmp) if args.committed or not args.dir else Path(args.dir)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "clipmech.cli", "view", str(study)], check=True, capture_output=True)
        command_s = time.perf_counter() - t0
        site = build_site(study)
        print(f"study {study}: {site.models} model pages, {site.circuits} circuits, site {site.bytes / 1e6:.2f} MB")
        print(f"generation: `clipmech view` command {command_s:.1f} s (fresh process), build_site alone {site.seconds:.2f} s")
        data = json.loads((site.index.parent / "data" / "study.js").read_text().split(", ", 1)[1].rsplit(");", 1)[0])
        pages = [("study", site.index.as_uri(), "document.body.dataset.ready === '1'")]
        with_circuits = [m["model_id"] for m in data["models"]
                         if json.loads((site.index.parent / m["page"]).read_text().split(", ", 1)[1].rsplit(");", 1)[0])["circuits"]["classes"]]
        model = with_circuits[0] if with_circuits else data["models"][0]["model_id"]
        drawn = "document.body.dataset.ready === '1' && document.body.dataset.page === 'model'"
        pages.append((f"model {model}", site.index.as_uri() + f"#model={model}", drawn))
        driver = chromium_driver(tmp / "profile")
        try:
            if with_circuits:
                driver.get(pages[-1][1])
                while not driver.execute_script(f"return !!({drawn})"):
                    time.sleep(0.01)
                node = driver.execute_script("return document.querySelector('svg.circuit circle.node').dataset.node")
                pages.append((f"node {node}", driver.current_url + f"&node={node}",
                              "document.body.dataset.ready === '1' && document.querySelector('#node-panel')"))
            print(f"{'page':48s} {'files':>5s} {'KB loaded':>10s} {'ms to drawn':>12s}")
            for name, url, ready in pages:
                n, size, ms = measure_page(driver, url, ready)
                print(f"{name:48s} {n:5d} {size / 1e3:10.1f} {ms:12.0f}")
                if args.shots:
                    args.shots.mkdir(parents=True, exist_ok=True)
                    full_page_screenshot(driver, args.shots, f"view_{name.split()[0]}")
        finally:
            driver.quit()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
