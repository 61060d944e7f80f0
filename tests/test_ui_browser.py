"""The MLflow UI in a real headless Chromium: from the home page to the experiment, to the run, to
its metric charts and its scaling plot, as a user would click. Screenshots land in the test's tmp
dir (`pytest --basetemp DIR` keeps them somewhere known)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from live_servers import MlflowServer, mlflow_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(300),
    pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
                              ".ci/run installs them)"),
]
EXPERIMENT, RUN_NAME = "digits", "digits-cnn-ui"
CURVES = ("train/loss", "train/samples_per_s", "val/accuracy")
WAIT_S = 60


@dataclass
class FinishedRun:
    server: MlflowServer
    run_id: str
    plot: Path


@pytest.fixture(scope="module")
def finished_run() -> Iterator[FinishedRun]:
    """A server holding one finished training run: params, curves, config and the scaling plot."""
    with mlflow_server("orch-ui-") as server:
        yield FinishedRun(server, *_log_run(server.uri, server.root))


def _log_run(uri: str, root: Path) -> tuple[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment(EXPERIMENT), run_name=RUN_NAME).info.run_id
    now = int(time.time() * 1000)
    curves = {"train/loss": lambda s: 2.3 * 0.9**s, "train/samples_per_s": lambda s: 4000 + 10 * s,
              "val/accuracy": lambda s: 1 - 0.9**s}
    client.log_batch(run_id, metrics=[Metric(k, f(s), now, s) for s in range(1, 31) for k, f in curves.items()],
                     params=[Param("training.lr", "0.003"), Param("resources.workers", "2")])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([1, 2, 4, 8], [1.0, 1.9, 3.6, 6.5], marker="o", label="predicted")
    ax.set(title="scaling: throughput vs workers", xlabel="workers", ylabel="speed-up")
    ax.legend()
    plot = root / "scaling.png"
    fig.savefig(plot)
    plt.close(fig)
    client.log_artifact(run_id, str(plot), "plan")  # the planner logs plan/scaling.png the same way
    client.set_terminated(run_id, "FINISHED")
    return run_id, plot


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1400,1000",
                # Only the test's own server exists for this browser: no name resolves, so nothing
                # on the page can reach an outside host.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_user_finds_curves_and_scaling_plot_of_a_finished_run(
    finished_run: FinishedRun, browser, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)

    def click(by: str, value: str) -> None:
        wait.until(ec.element_to_be_clickable((by, value))).click()

    browser.get(finished_run.server.uri)
    click(By.XPATH, "//*[normalize-space(text())='Model training']")  # MLflow 3 opens on its GenAI view
    click(By.LINK_TEXT, EXPERIMENT)
    click(By.LINK_TEXT, RUN_NAME)
    wait.until(ec.url_contains(f"/runs/{finished_run.run_id}"))
    wait.until(ec.visibility_of_element_located((By.XPATH, "//*[normalize-space(text())='Finished']")))
    browser.save_screenshot(str(tmp_path / "1-run.png"))

    click(By.XPATH, "//button[@role='tab'][normalize-space()='Model metrics']")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= len(CURVES))
    wait.until(lambda d: set(CURVES) <= _legend_curves(d))  # each chart has drawn its curve
    browser.save_screenshot(str(tmp_path / "2-metrics.png"))

    click(By.XPATH, "//button[@role='tab'][normalize-space()='Artifacts']")
    click(By.XPATH, "//*[normalize-space(text())='plan']")
    click(By.XPATH, "//*[normalize-space(text())='scaling.png']")
    image = wait.until(lambda d: next((i for i in d.find_elements(By.CSS_SELECTOR, "img[src^='blob:']")
                                       if i.size["width"] > 100 and i.get_property("naturalWidth")), None))
    browser.save_screenshot(str(tmp_path / "3-scaling-plot.png"))

    assert image.get_property("naturalWidth") == 500  # the PNG we logged (5 in x 100 dpi), decoded
    assert "plan/scaling.png" in browser.find_element(By.TAG_NAME, "body").text
    assert all((tmp_path / f).stat().st_size > 10_000 for f in ("1-run.png", "2-metrics.png", "3-scaling-plot.png"))


def _legend_curves(driver) -> set[str]:
    """Curve names in the charts' legends, e.g. 'digits-cnn-ui (train/loss)' -> 'train/loss'."""
    from selenium.webdriver.common.by import By

    texts = [e.get_attribute("textContent") or "" for e in driver.find_elements(By.CSS_SELECTOR, ".legendtext")]
    texts += [e.text for e in driver.find_elements(By.XPATH, f"//*[contains(text(), '{RUN_NAME} (')]")]
    return {t.split("(", 1)[1].rstrip(")") for t in texts if "(" in t}
