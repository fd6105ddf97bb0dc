"""The Prefect UI in headless Chromium: the build-image deployment's form filled in and submitted as a
person would, the run it started completing, and the finished build's summary.

A real Prefect server on 127.0.0.1 with kiln's deployments and a process worker. Chromium (Debian's
`chromium` and `chromium-driver`, driven by Selenium) opens the deployment's custom-run form, types the
image's name, adds its elements, sets the size and the build options (output directory, element path,
boot test off), clicks Submit; the worker builds it; then Chromium opens the run's summary artifact.
Screenshots go to test-artifacts/ (gitignored). About 2-3 minutes here.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.server import api_http
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


def log_in(driver: object, stack: PrefectStack) -> None:
    """The UI's login page, as a person meets it: the server asks for credentials (issue 15), and the auth
    string from kiln's state directory (`api-auth`, what `kiln serve` points to) is typed in."""
    driver.get(stack.ui_url)  # type: ignore[attr-defined]
    wait_for_text(driver, ["Login"])
    field = driver.find_element("css selector", "input[type=password]")  # type: ignore[attr-defined]
    field.send_keys((stack.state / api_http.AUTH_FILE).read_text())
    driver.find_element("css selector", "button[type=submit]").click()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while "/login" in driver.current_url and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.5)
    assert "/login" not in driver.current_url, driver.current_url  # type: ignore[attr-defined]


class Form:
    """The custom-run form of a deployment, found by its fields' labels (Prefect's schema form)."""

    def __init__(self, driver: object) -> None:
        self.d = driver

    def field(self, label: str, *, last: bool = False) -> object:
        """The form property labelled `label` (the first, or the last: spec fields come before options')."""
        xpath = ("//div[contains(concat(' ', @class, ' '), ' schema-form-property ')]"
                 f"[./div[contains(@class, 'p-label__header')]//span[normalize-space()='{label}']]")
        deadline = time.monotonic() + 20  # a sub-form just opened renders client-side, later under load
        found = self.d.find_elements("xpath", xpath)  # type: ignore[attr-defined]
        while not found and time.monotonic() < deadline:
            time.sleep(0.5)
            found = self.d.find_elements("xpath", xpath)  # type: ignore[attr-defined]
        assert found, f"the form has no field {label!r}"
        return found[-1] if last else found[0]

    def click(self, element: object) -> None:
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)  # type: ignore[attr-defined]
        time.sleep(0.2)
        element.click()  # type: ignore[attr-defined]

    def body(self, field: object) -> object:
        return field.find_element("xpath", "./div[contains(@class, 'p-label__body')]")  # type: ignore[attr-defined]

    def type(self, label: str, text: str, *, last: bool = False) -> None:
        box = self.body(self.field(label, last=last)).find_elements(  # type: ignore[attr-defined]
            "xpath", ".//textarea|.//input[not(@type='checkbox')]")[-1]
        self.click(box)
        box.clear()
        box.send_keys(text)

    def add_items(self, label: str, items: list[str]) -> None:
        for item in items:
            body = self.body(self.field(label))
            self.click(body.find_element("xpath", ".//button[normalize-space()='Add item']"))  # type: ignore[attr-defined]
            time.sleep(0.5)
            self.type(label, item)

    def toggle(self, label: str, *, last: bool = False) -> None:
        self.click(self.body(self.field(label, last=last)).find_element(  # type: ignore[attr-defined]
            "xpath", ".//label[@role='switch']"))

    def button(self, text: str) -> None:
        self.click(self.d.find_element("xpath", f"//button[normalize-space()='{text}']"))  # type: ignore[attr-defined]


def test_build_image_form_filled_and_run_clicked_then_the_runs_summary(stack: PrefectStack, browser: object,
                                                                        tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    name = f"ui-form-{secrets.token_hex(3)}"
    out = tmp_path / "out"
    dep = stack.call("GET", "/deployments/name/build-on-host/build-image")
    log_in(browser, stack)
    browser.get(f"{stack.ui_url}/deployments/deployment/{dep['id']}/run")  # type: ignore[attr-defined]
    text = wait_for_text(browser, ["Spec", "Distro", "Release", "Arch", "Elements", "Packages", "Submit"])
    assert "Boot Test" in text or "boot_test" in text
    form = Form(browser)
    form.type("Name (Optional)", name)
    form.add_items("Elements (Optional)", ["vm", "small-step"])
    form.type("Size (Optional)", str(2 * 1024**3))  # the form takes bytes: see the report (ImageSpec.size schema)
    form.button("BuildOptions")  # options: None -> a form of its own
    form.type("Output (Optional)", str(out))
    form.add_items("Elements Path (Optional)", [str(REPO / "tests/data/elements")])
    form.toggle("Boot Test (Optional)", last=True)  # the options' boot test switch, not the spec's section
    browser.save_screenshot(str(ARTIFACTS / "ui-build-image-form.png"))  # type: ignore[attr-defined]
    form.button("Submit")

    deadline = time.monotonic() + 60
    runs: list[dict[str, object]] = []
    while not runs and time.monotonic() < deadline:
        time.sleep(1)
        runs = [r for r in stack.call("POST", "/flow_runs/filter",
                                      {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}})
                if (r["parameters"].get("spec") or {}).get("name") == name]
    assert len(runs) == 1, "Submit started no run (or more than one)"
    run_id = str(runs[0]["id"])
    params = runs[0]["parameters"]
    assert params["spec"]["elements"] == ["vm", "small-step"] and params["spec"]["size"] == 2 * 1024**3
    assert params["options"]["output"] == str(out) and params["options"]["boot_test"] is False
    assert params["options"]["elements_path"] == [str(REPO / "tests/data/elements")]

    run = stack.wait(run_id, timeout=1500)
    assert run["state_type"] == "COMPLETED", f"{run['state']['message']}\n{stack.log_tail()}"
    assert (out / "manifest.json").is_file() and (out / f"{name}.qcow2").is_file()
    builds = stack.child_runs(run_id)
    assert [b["name"] for b in builds] and builds[0]["state_type"] == "COMPLETED"
    [summary] = [a for a in stack.artifacts(builds[0]["id"]) if a["type"] == "markdown"]
    assert summary["key"] == f"build-{name}"

    browser.get(f"{stack.ui_url}/artifacts/artifact/{summary['id']}")  # type: ignore[attr-defined]
    text = wait_for_text(browser, [name, f"{name}.qcow2", "stage", "fetch_base", "Boot test: skipped"])
    browser.save_screenshot(str(ARTIFACTS / "ui-build-summary-artifact.png"))  # type: ignore[attr-defined]
    assert "sha256" in text

    browser.get(f"{stack.ui_url}/runs/flow-run/{run_id}")  # type: ignore[attr-defined]
    wait_for_text(browser, [run["name"], "Completed"])
    browser.save_screenshot(str(ARTIFACTS / "ui-build-on-host-run.png"))  # type: ignore[attr-defined]
