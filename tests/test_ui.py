"""The Prefect UI in headless Chromium: the build-image deployment's form and a finished build's summary.

A real Prefect server on 127.0.0.1 with kiln's deployments and a process worker; one small build runs
through the build-image deployment (as the form's Run button would start it); then Chromium (Debian's
`chromium` and `chromium-driver`, driven by Selenium) opens the deployment's custom-run form and the
run's summary artifact. Screenshots go to test-artifacts/ (gitignored). About 2-3 minutes here.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_deployments_stack import REPO, PrefectStack

pytestmark = pytest.mark.slow
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

webdriver = pytest.importorskip("selenium.webdriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectStack]:
    s = PrefectStack(tmp_path_factory.mktemp("prefect-ui"))
    try:
        s.start()
        s.deploy()
        s.worker("ui-worker", PREFECT_WORKER_QUERY_SECONDS="2")
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1800", "--proxy-server=direct://", "--proxy-bypass-list=*"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_text(driver: object, texts: list[str], timeout: float = 90) -> str:
    """The page's visible text once it contains every one of `texts` (the UI renders client-side)."""
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        try:
            body = driver.find_element("tag name", "body").text  # type: ignore[attr-defined]
        except Exception:
            body = ""
        if all(t in body for t in texts):
            time.sleep(1.0)  # let late parts (icons, fonts) settle before a screenshot
            return str(driver.find_element("tag name", "body").text)  # type: ignore[attr-defined]
        time.sleep(1.0)
    missing = [t for t in texts if t not in body]
    shot = ARTIFACTS / f"failed-{int(time.time())}.png"
    driver.save_screenshot(str(shot))  # type: ignore[attr-defined]
    raise AssertionError(f"{missing} never appeared (screenshot {shot}); page text:\n{body[:3000]}")


def test_build_image_form_and_a_finished_runs_summary(stack: PrefectStack, browser: object, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    spec = {"name": "ui-small", "release": "bookworm", "arch": "amd64", "elements": ["vm", "small-step"],
            "size": 2 * 1024**3}  # the form takes bytes: see the report (ImageSpec.size schema)
    run_id = stack.run_deployment("build-on-host/build-image", {
        "spec": spec,
        "options": {"output": str(tmp_path / "out"), "boot_test": False,
                    "elements_path": [str(REPO / "tests/data/elements")]},
    })

    dep = stack.call("GET", "/deployments/name/build-on-host/build-image")
    browser.get(f"{stack.ui_url}/deployments/deployment/{dep['id']}/run")  # type: ignore[attr-defined]
    text = wait_for_text(browser, ["Spec", "Distro", "Release", "Arch", "Elements", "Packages"])
    browser.save_screenshot(str(ARTIFACTS / "ui-build-image-form.png"))  # type: ignore[attr-defined]
    assert "Boot Test" in text or "boot_test" in text

    run = stack.wait(run_id, timeout=1500)
    assert run["state_type"] == "COMPLETED", f"{run['state']['message']}\n{stack.log_tail()}"
    builds = stack.child_runs(run_id)
    assert [b["name"] for b in builds] and builds[0]["state_type"] == "COMPLETED"
    [summary] = [a for a in stack.artifacts(builds[0]["id"]) if a["type"] == "markdown"]
    assert summary["key"] == "build-ui-small"

    browser.get(f"{stack.ui_url}/artifacts/artifact/{summary['id']}")  # type: ignore[attr-defined]
    text = wait_for_text(browser, ["ui-small", "ui-small.qcow2", "stage", "fetch_base", "Boot test: skipped"])
    browser.save_screenshot(str(ARTIFACTS / "ui-build-summary-artifact.png"))  # type: ignore[attr-defined]
    assert "sha256" in text

    browser.get(f"{stack.ui_url}/runs/flow-run/{run_id}")  # type: ignore[attr-defined]
    wait_for_text(browser, [run["name"], "Completed"])
    browser.save_screenshot(str(ARTIFACTS / "ui-build-on-host-run.png"))  # type: ignore[attr-defined]
