"""The README's MLflow screenshots, taken as a person sees the demo: `mlflow ui` on loopback
over a finished `make demo`, pages opened in headless Chromium (Debian's `chromium`), the
parent run expanded by a click. Needs Playwright for the clicking (`pip install playwright`
in any environment; its own browser download is not used):

    python docs/screenshots.py [STUDY_DIR]      (default runs/demo; writes docs/mlflow_*.png)
"""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
PORT = 5057


def child_run(uri: str) -> tuple[str, str]:
    """(experiment id, the run id of the study's best-utilized trial), read with the .venv's MLflow."""
    code = ("import sys; from mlflow.tracking import MlflowClient; c = MlflowClient(sys.argv[1]); "
            "e = c.search_experiments()[0]; rs = [r for r in c.search_runs([e.experiment_id]) "
            "if 'mlflow.parentRunId' in r.data.tags]; "
            "print(e.experiment_id, max(rs, key=lambda r: r.data.metrics.get('utilization', 0)).info.run_id)")
    out = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", code, uri], capture_output=True, text=True, check=True)
    experiment, run = out.stdout.split()
    return experiment, run


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "runs" / "demo").resolve()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    experiment, run = child_run(uri)
    ui = subprocess.Popen([str(ROOT / ".venv/bin/mlflow"), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                           "--port", str(PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{PORT}"
    try:
        for _ in range(60):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except OSError:
                time.sleep(1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning")
            page.wait_for_selector("text=matching runs", timeout=30000)
            page.wait_for_timeout(1500)
            if page.locator("[aria-label='Close']").count():
                page.locator("[aria-label='Close']").first.click()           # the Assistant panel
            page.locator("[role='row']", has_text="quickstart").first.locator("button, [role='button']").first.click()
            page.wait_for_timeout(1500)                                        # the parent run, expanded
            page.screenshot(path=str(ROOT / "docs" / "mlflow_runs.png"))
            page.goto(f"{base}/#/experiments/{experiment}/runs/{run}/model-metrics?workflowType=machine_learning")
            page.wait_for_timeout(5000)
            page.screenshot(path=str(ROOT / "docs" / "mlflow_trial_metrics.png"))
            browser.close()
    finally:
        ui.terminate()
    print("wrote docs/mlflow_runs.png, docs/mlflow_trial_metrics.png")


if __name__ == "__main__":
    main()
