"""A person's release: the Prefect UI's run form of the `release` deployment, filled in
a real browser (Debian's chromium through Selenium), run by the worker `gantry serve`
started, to a completed release. Leaves a screenshot of the finished run in
.gantry/test-artifacts/ (and refreshes docs/ui-release.png with GANTRY_UPDATE_DOCS=1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from gantry.localenv.services import worker_service
from gantry.settings import Settings
from tests.support import REPO_ROOT, GantryEnv, PrefectServer, free_port

pytestmark = pytest.mark.e2e

ARTIFACTS = REPO_ROOT / ".gantry" / "test-artifacts"


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed: run `make system-deps` (Debian's {name})")
    return found


@pytest.fixture
def served(
    gantry_env: GantryEnv, prefect_server: PrefectServer, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """`gantry serve` on the session's services; its worker is stopped after (not with
    `gantry env down`, which would stop the session's registry and hub too)."""
    env = {
        **os.environ,
        **gantry_env.env,
        **prefect_server.env(),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "GANTRY_WORKER_PORT": str(free_port()),
    }
    worker = worker_service(Settings.from_env(env))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gantry.cli", "serve", "--deployment", "release"],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        yield env
    finally:
        worker.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = _tool("chromium")
    # --no-sandbox: the test runs as root in a container, where chromium's sandbox cannot.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(_tool("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _field(label: str) -> str:
    """XPath of the input of the form field whose own label is ``label``."""
    return (
        "//div[contains(@class,'schema-form-property')]"
        f"[./div[@class='p-label__header']//span[normalize-space()='{label}']]"
        "//*[self::textarea or self::input]"
    )


def _api(server: PrefectServer, call: str, *args: Any) -> Any:
    from prefect.client.orchestration import PrefectClient

    async def run() -> Any:
        async with PrefectClient(api=server.api_url) as client:
            return await getattr(client, call)(*args)

    return anyio.run(run)


def test_release_from_the_ui_run_form(
    served: dict[str, str],
    prefect_server: PrefectServer,
    gantry_env: GantryEnv,
    browser: Any,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    deployment = _api(prefect_server, "read_deployment_by_name", "release/release")
    commit = gantry_env.revisions["v1"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        browser.get(f"{prefect_server.ui_url}/deployments/deployment/{deployment.id}/run")
        wait = WebDriverWait(browser, 90)
        revision = wait.until(ec.element_to_be_clickable((By.XPATH, _field("Revision (Optional)"))))
        repo = browser.find_element(By.XPATH, _field("Repository"))
        # The form starts from the deployment's defaults: the demo release.
        assert repo.get_attribute("value") == "gantry-demo/all-MiniLM-L6-v2"
        assert revision.get_attribute("value") == "v1"
        # Pin the release to v1's commit, as a careful person would.
        revision.send_keys(Keys.CONTROL, "a")
        revision.send_keys(commit)
        submit = "//button[@type='submit'][normalize-space()='Submit']"
        browser.find_element(By.XPATH, submit).click()
        # The UI goes back to the deployment's runs once the server has accepted the run.
        wait.until(lambda d: not d.current_url.endswith("/run"))
        (run,) = _runs(prefect_server, deployment.id)
        assert run.parameters["spec"]["source"]["revision"] == commit

        deadline = time.monotonic() + 1200
        while not run.state.is_final():
            assert time.monotonic() < deadline, f"run still {run.state.name} after 20 min"
            time.sleep(5)
            run = _api(prefect_server, "read_flow_run", run.id)
        assert run.state.is_completed(), _worker_log_tail(served)
        records = Settings.from_env(served).releases_dir.glob("minilm-*.json")
        assert any(commit in r.read_text() for r in records), "no release record of this spec"

        browser.get(f"{prefect_server.ui_url}/runs/flow-run/{run.id}")
        completed = "//*[contains(@class,'state-badge')][contains(@class,'state--completed')]"
        wait.until(ec.presence_of_element_located((By.XPATH, completed)))
        time.sleep(2)  # let the timeline and logs finish rendering for the picture
        shot = ARTIFACTS / "ui-release.png"
        assert browser.save_screenshot(str(shot))
        if os.environ.get("GANTRY_UPDATE_DOCS") == "1":
            (REPO_ROOT / "docs").mkdir(exist_ok=True)
            shutil.copyfile(shot, REPO_ROOT / "docs" / "ui-release.png")
    except BaseException:
        browser.save_screenshot(str(ARTIFACTS / "ui-release-failure.png"))
        (ARTIFACTS / "ui-release-failure.html").write_text(browser.page_source)
        raise


def _runs(server: PrefectServer, deployment_id: uuid.UUID) -> list[Any]:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    async def read() -> list[Any]:
        async with PrefectClient(api=server.api_url) as client:
            return list(
                await client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                    sort=FlowRunSort.ID_DESC,  # explicit: the 3.8.8 server refuses a null sort
                    limit=10,
                )
            )

    return anyio.run(read)


def _worker_log_tail(env: dict[str, str]) -> str:
    log = Settings.from_env(env).services_dir / "worker.log"
    return "\n".join(log.read_text(errors="replace").splitlines()[-60:]) if log.exists() else ""
