"""Browser check of the MLflow UI on a medimgen store: what a person sees when comparing an LDM with a DDPM.

Starts `mlflow ui` on the store, opens in headless Chromium (Debian package `chromium`) the links medimgen prints
(the experiment's runs table, `workflowType=machine_learning`) and the compare page of the newest LDM and DDPM
training runs, screenshots both into docs/, and asserts on the rendered page text: the runs table (not MLflow 3's
GenAI traces view) lists both runs, and the compare page shows their quality/* metrics side by side.

    python benchmarks/mlflow_ui_check.py --store sqlite:////path/to/mlflow.db [--experiment Dataset990_Phantom]

Exit status 0 when every check passes; one line per failed check otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
QUALITY_KEYS = ("quality/mmd_stats", "quality/ms_ssim", "quality/memorised_fraction")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(store: str, port: int, artifacts: str | None) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", store, "--port", str(port),
           "--host", "127.0.0.1", "--workers", "1"]
    if artifacts:
        cmd += ["--default-artifact-root", artifacts]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(480):  # a loaded machine takes a minute or more
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"mlflow ui did not answer on port {port} within 4 minutes")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium: `apt-get install -y chromium` (Debian package)")


def browse(url: str, screenshot: Path | None, budget_ms: int = 15000, height: int = 1000) -> str:
    """The rendered page text (DOM after scripts ran) of ``url``; a screenshot too when ``screenshot``."""
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--window-size=1600,{height}", f"--virtual-time-budget={budget_ms}"]
    with tempfile.TemporaryDirectory() as profile:
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([*base, f"--user-data-dir={profile}", f"--screenshot={screenshot}", url],
                           check=True, capture_output=True, timeout=240)
        with tempfile.TemporaryDirectory() as profile2:
            out = subprocess.run([*base, f"--user-data-dir={profile2}", "--dump-dom", url], check=True,
                                 capture_output=True, text=True, timeout=240)
    return out.stdout


def newest_runs(store: str, experiment: str | None):
    """(experiment id, LDM run, DDPM run): the newest finished training runs (not trials) of each."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    exps = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
    for exp in exps:
        if exp is None:
            continue
        runs = {}
        for model in ("ldm", "ddpm"):
            found = client.search_runs([exp.experiment_id], f"tags.`medimgen.model` = '{model}' and "
                                       f"attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
            # training runs only: not trials, not side runs nested under a run (`evaluate`'s)
            found = [r for r in found if r.data.tags.get("medimgen.tuning_trial") != "true"
                     and "mlflow.parentRunId" not in r.data.tags
                     and any(k.startswith("quality/") for k in r.data.metrics)]
            if found:
                runs[model] = found[0]
        if len(runs) == 2:
            return exp.experiment_id, runs["ldm"], runs["ddpm"]
    raise SystemExit(f"no experiment{' ' + experiment if experiment else ''} with a finished, scored LDM and DDPM "
                     f"training run in {store}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="MLflow tracking URI, e.g. sqlite:////abs/path/mlflow.db")
    ap.add_argument("--experiment", default=None)
    ap.add_argument("--out", default=str(REPO / "docs"), help="folder of the screenshots")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from medimgen.runs.tracking import RUNS_VIEW, runs_view_url

    exp_id, ldm, ddpm = newest_runs(args.store, args.experiment)
    port = free_port()
    ui = start_ui(args.store, port, None)
    failures = []
    try:
        base = f"http://127.0.0.1:{port}"
        table_url = runs_view_url(exp_id).replace("http://127.0.0.1:5000", base)
        runs = json.dumps([ldm.info.run_id, ddpm.info.run_id], separators=(",", ":"))
        compare_url = (f"{base}/#/compare-runs?runs={quote(runs)}&experiments={quote(json.dumps([exp_id]))}"
                       f"&{RUNS_VIEW}")
        out = Path(args.out)
        table = browse(table_url, out / "mlflow_runs_table.png")
        compare = browse(compare_url, out / "mlflow_compare_ldm_ddpm.png", height=3600)
        for name in (ldm.info.run_name, ddpm.info.run_name):
            if name not in table:
                failures.append(f"runs table: run {name} not shown ({table_url})")
        if "Traces" in table and ldm.info.run_name not in table:
            failures.append("runs table: the GenAI traces view opened instead of the runs")
        for key in QUALITY_KEYS:
            if key not in compare:
                failures.append(f"compare page: {key} not shown ({compare_url})")
        print(f"runs table:   {table_url}\ncompare page: {compare_url}\nscreenshots:  {out}/mlflow_runs_table.png, "
              f"{out}/mlflow_compare_ldm_ddpm.png")
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    for f in failures:
        print(f"FAIL {f}")
    print("browser check " + ("failed" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
