"""The MLflow UI in a real headless Chromium: from the home page to the experiment, to the run, to
its metric charts, its system metrics, predicted and observed step time on one chart, and its
scaling plot, as a user would click. The run is written by the driver's own code (the tracker and
the recorder, fed the events a training job sends), without training. Screenshots land in the
test's tmp dir (`pytest --basetemp DIR` keeps them somewhere known)."""

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
    """A run as `orchestrator run` writes it: through the tracker, from the workers' events."""
    from types import SimpleNamespace

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orchestrator.driver.policies import GroupKind
    from orchestrator.driver.recorder import Recorder
    from orchestrator.driver.replan import comparison
    from orchestrator.driver.tracked_run import TrackedRun
    from orchestrator.tracking import Tracker
    from trainers.events import Evaluated, GroupStarted, StepPoint, StepsDone, SystemSample

    tracker = Tracker(uri, spill_dir=root / "spill")
    run = TrackedRun(tracker, tracker.open_run(experiment=EXPERIMENT, run_key="ui-test", run_name=RUN_NAME))
    run.log_params({"training.lr": 0.003, "resources.workers": 2})
    run.set_description(f"**{RUN_NAME}**: the UI test's run.")
    recorder = Recorder(run, status=lambda message: None, global_batch=64)
    recorder.group_started(GroupStarted(step=0, workers=2, local_batch=32, accumulation=1), GroupKind.FIRST)
    now = int(time.time() * 1000) - 60_000
    predicted = SimpleNamespace(step_time_s=0.020, step_time_low_s=0.016, step_time_high_s=0.027)
    for step in range(1, 31):
        observed = 0.022 + 0.002 * (step % 3)
        point = StepPoint(step=step, at_ms=now + 1000 * step, metrics={
            "train/loss": 2.3 * 0.9**step, "train/samples_per_s": 64 / observed, "train/step_time_s": observed})
        recorder.steps(StepsDone(step=step, points=(point,), step_times_s=(observed,), observed_step_time_s=observed,
                                 observed_steps=step))
        if step % 10 == 0:
            recorder.evaluated(Evaluated(step=step, metrics={"val/accuracy": 1 - 0.9**step}, at_ms=point.at_ms))
            recorder.log_metrics(comparison(observed, predicted), step=step)
        if step % 5 == 0:
            recorder.system(SystemSample(step=step, node="node-1a2b3c4d", at_ms=point.at_ms, metrics={
                "cpu_utilization_percentage": 50.0 + step, "system_memory_usage_megabytes": 900.0 + step}))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([1, 2, 4, 8], [1.0, 1.9, 3.6, 6.5], marker="o", label="predicted")
    ax.set(title="scaling: throughput vs workers", xlabel="workers", ylabel="speed-up")
    ax.legend()
    plot = root / "scaling.png"
    fig.savefig(plot)
    plt.close(fig)
    run.log_artifact(plot, "plan")  # the planner logs plan/scaling.png the same way
    assert run.wait_resolved(WAIT_S)
    run.drain_warnings()  # the description gains its chart link now that the run has an id
    run.finish("FINISHED")
    report = run.close()
    assert report.spill_file is None, report.lines()
    return run.run_id, plot


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
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # A chart redrawn while its legend is read leaves stale elements: read again, as a user looks again.
    wait = WebDriverWait(browser, WAIT_S, ignored_exceptions=(StaleElementReferenceException,))

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
    search = wait.until(ec.element_to_be_clickable((By.XPATH, "//input[@placeholder='Search metric charts']")))
    for curve in CURVES:  # the charts are many (train, val, plan, elastic): find each by name
        search.send_keys(Keys.CONTROL + "a")
        search.send_keys(Keys.DELETE)
        search.send_keys(curve)
        wait.until(lambda d, c=curve: c in _legend_curves(d))  # its chart has drawn its curve
    browser.save_screenshot(str(tmp_path / "2-metrics.png"))

    click(By.XPATH, "//button[@role='tab'][normalize-space()='System metrics']")
    wait.until(lambda d: {"system/node-1a2b3c4d/cpu_utilization_percentage"} <= _legend_curves(d))
    browser.save_screenshot(str(tmp_path / "2b-system-metrics.png"))

    # The description's link: predicted and observed step time on one chart, one scale (a new tab).
    click(By.XPATH, "//button[@role='tab'][normalize-space()='Overview']")
    run_page = browser.current_window_handle
    click(By.PARTIAL_LINK_TEXT, "Predicted vs observed step time")
    wait.until(lambda d: len(d.window_handles) == 2)
    browser.switch_to.window(next(h for h in browser.window_handles if h != run_page))
    both = {"plan/observed_step_time_s", "plan/predicted_step_time_s"}
    wait.until(lambda d: both <= _legend_curves(d))
    assert len(browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) == 1  # one chart holds them
    browser.save_screenshot(str(tmp_path / "2c-step-time.png"))
    browser.close()
    browser.switch_to.window(run_page)

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
