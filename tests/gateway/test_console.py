"""The read-only web console (openrl/gateway/console.py) in a real headless browser: Debian's
chromium driven by Selenium against `openrl up`. A run trained here with the tinker SDK shows up
with its steps, its loss curve drawn from the trainer's own records (the same loss:sum the SDK got
back), its checkpoints and its sampler; another key sees none of it; a wrong key gets the sign-in
error. Screenshots go to $OPENRL_TEST_ARTIFACTS/console (CI: test-artifacts/console in the
checkout), else to pytest's temporary directory; the path is printed.

Without chromium and chromedriver the browser tests skip, or fail where OPENRL_BROWSER_REQUIRED=1
(.ci/run sets it and installs both).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
import tinker

from sdk_helpers import training_client
from stack_helpers import API_KEY, BASE_MODEL, OTHER_KEY

pytestmark = pytest.mark.timeout(600)

STEPS = 3
CONSOLE = "/console"


# -- the run the console should show ---------------------------------------------------------


@pytest.fixture(scope="module")
def run(stack, data):
    """A few SFT steps of API_KEY's, with the loss:sum the SDK got back for each step, a
    checkpoint, named sampler weights and a sampler."""
    service, tc = training_client(stack, seed=7171, rank=4)
    losses = []
    for i in range(STEPS):
        fb = tc.forward_backward(data[:4], loss_fn="cross_entropy")
        opt = tc.optim_step(tinker.types.AdamParams(learning_rate=5e-3))
        losses.append(fb.result(timeout=120).metrics["loss:sum"])
        opt.result(timeout=120)
    state = tc.save_state("console-state").result(timeout=120).path
    weights = tc.save_weights_for_sampler("console-weights").result(timeout=120).path
    service.create_sampling_client(model_path=weights)
    return {"model_id": tc.model_id, "session_id": tc.model_id.split(":")[0], "losses": losses, "state": state, "weights": weights}


# -- the browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    root = os.environ.get("OPENRL_TEST_ARTIFACTS")
    path = Path(root) / "console" if root else tmp_path_factory.mktemp("console-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        why = "chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("OPENRL_BROWSER_REQUIRED") == "1":
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1100",
                "--disable-extensions", "--no-first-run", "--disable-background-networking"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _sign_in(browser, stack, key: str) -> None:
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(f"{stack.url}/")  # / points at the console, which asks to sign in
    assert browser.current_url.endswith(f"{CONSOLE}/sign-in"), browser.current_url
    browser.find_element(By.ID, "api_key").send_keys(key)
    form = browser.find_element(By.ID, "sign-in")
    form.click()
    # A click submits the form without waiting for the answer's page: wait until this one is gone.
    _wait(lambda: _gone(form), timeout_s=30, every_s=0.1, what="the sign-in form's answer")


def _gone(element) -> bool:
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    try:
        element.is_enabled()
        return False
    except StaleElementReferenceException:
        return True
    except WebDriverException as e:
        # Mid-navigation chromedriver may answer for the old node with an inspector error
        # instead of a stale reference: the node is from a document that is gone all the same.
        if "does not belong to the document" in str(e):
            return True
        raise


def _wait(condition, timeout_s: float = 30, every_s: float = 0.5, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result or time.monotonic() > deadline:
            assert result, f"timed out waiting for {what}"
            return result
        time.sleep(every_s)


def _shot(browser, artifacts: Path, name: str) -> None:
    path = artifacts / f"{name}.png"
    assert browser.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_the_key_sees_its_run_curve_checkpoints_and_samplers(stack, run, browser, artifacts):
    from selenium.webdriver.common.by import By

    _sign_in(browser, stack, API_KEY)
    assert browser.current_url.endswith(CONSOLE), browser.current_url
    cookie = browser.get_cookie("openrl_console")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == CONSOLE, cookie
    assert API_KEY not in cookie["value"] and API_KEY not in browser.page_source

    # Usage records follow each result by a moment: reload until all the steps are there.
    def row():
        browser.refresh()
        found = browser.find_elements(By.CSS_SELECTOR, f'#runs tr[data-run="{run["model_id"]}"]')
        return found[0] if found and found[0].find_element(By.CSS_SELECTOR, "td.steps").text == str(STEPS) else None

    found = _wait(row, what=f"{STEPS} steps of {run['model_id']} in the runs table")
    cells = [td.text for td in found.find_elements(By.TAG_NAME, "td")]
    assert cells[1] == BASE_MODEL and cells[2] == "4", cells
    assert int(cells[4].replace(",", "")) > 0, cells  # tokens trained
    checkpoint_paths = {tr.get_attribute("data-path") for tr in browser.find_elements(By.CSS_SELECTOR, "#checkpoints tr[data-path]")}
    assert {run["state"], run["weights"]} <= checkpoint_paths
    assert any(run["weights"] in tr.text for tr in browser.find_elements(By.CSS_SELECTOR, "#samplers tr"))
    kinds = {tr.get_attribute("data-kind") for tr in browser.find_elements(By.CSS_SELECTOR, "#workers tr[data-kind]")}
    assert {"trainer", "sampler"} <= kinds, kinds
    streams = {tr.get_attribute("data-stream") for tr in browser.find_elements(By.CSS_SELECTOR, "#queues tr[data-stream]")}
    assert {"OPENRL_TRAIN", "OPENRL_SAMPLE"} <= streams, streams
    _shot(browser, artifacts, "overview")

    link = found.find_element(By.TAG_NAME, "a")
    link.click()
    _wait(lambda: _gone(link), timeout_s=30, every_s=0.1, what="the run's page")
    assert browser.find_element(By.ID, "run-id").text == run["model_id"]
    assert browser.find_element(By.ID, "steps").text == str(STEPS)
    path = browser.find_element(By.CSS_SELECTOR, "svg#loss-curve path.curve").get_attribute("d")
    points = re.findall(r"[ML]([\d.]+),([\d.]+)", path)
    assert len(points) == STEPS and len({x for x, _ in points}) == STEPS, path
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg#loss-curve circle.point")) == STEPS
    # The curve is drawn: the browser laid the path out with a real extent.
    box = browser.find_element(By.CSS_SELECTOR, "svg#loss-curve path.curve").rect
    assert box["width"] > 100, box
    # Per-step metrics: the loss:sum the SDK got back for each step, and each step's grad norm.
    headers = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#steps-table thead th")]
    rows = {int(tr.get_attribute("data-step")): [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in browser.find_elements(By.CSS_SELECTOR, "#steps-table tbody tr")}  # fmt: skip
    assert sorted(rows) == list(range(1, STEPS + 1)), rows
    for step, loss in enumerate(run["losses"], start=1):
        assert float(rows[step][headers.index("loss:sum")]) == pytest.approx(loss, rel=1e-5), (step, rows[step], loss)
        assert float(rows[step][headers.index("grad_norm:mean")]) > 0
    # The points are where the losses put them: the SVG's y grows downward, so of two steps
    # the one with the higher loss is drawn higher up (the batches are the same: so is tokens:sum).
    for i in range(STEPS):
        for j in range(STEPS):
            if run["losses"][i] > run["losses"][j] * (1 + 1e-6):
                assert float(points[i][1]) < float(points[j][1]), (points, run["losses"])
    assert {run["state"], run["weights"]} == {tr.get_attribute("data-path") for tr in browser.find_elements(By.CSS_SELECTOR, "#checkpoints tr[data-path]")}
    assert all(tr.find_element(By.CSS_SELECTOR, "td.public").text == "private" for tr in browser.find_elements(By.CSS_SELECTOR, "#checkpoints tr[data-path]"))
    _shot(browser, artifacts, "run")

    sign_out = browser.find_element(By.ID, "sign-out")
    sign_out.click()
    _wait(lambda: _gone(sign_out), timeout_s=30, every_s=0.1, what="the sign-out's answer")
    assert browser.current_url.endswith(f"{CONSOLE}/sign-in") and browser.get_cookie("openrl_console") is None
    browser.get(f"{stack.url}{CONSOLE}/runs/{run['model_id']}")
    assert browser.current_url.endswith(f"{CONSOLE}/sign-in")


def test_another_key_sees_nothing_of_the_first(stack, run, browser, artifacts):
    from selenium.webdriver.common.by import By

    _sign_in(browser, stack, OTHER_KEY)
    assert browser.current_url.endswith(CONSOLE), browser.current_url
    page = browser.page_source
    for secret in (run["model_id"], run["session_id"], run["state"], run["weights"]):
        assert secret not in page, secret
    _shot(browser, artifacts, "other-key")
    browser.get(f"{stack.url}{CONSOLE}/runs/{run['model_id']}")
    assert browser.find_element(By.ID, "not-found")
    assert not browser.find_elements(By.ID, "loss-curve") and run["state"] not in browser.page_source


def test_a_wrong_key_gets_the_sign_in_error(stack, run, browser, artifacts):
    from selenium.webdriver.common.by import By

    for wrong in ("tml-not-a-key-at-all", API_KEY + "x", "eyJhbGciOiJIUzI1NiJ9.e30.x"):
        _sign_in(browser, stack, wrong)
        assert browser.find_element(By.ID, "sign-in-error").is_displayed()
        assert browser.current_url.endswith(f"{CONSOLE}/sign-in")
        assert browser.get_cookie("openrl_console") is None
        assert run["model_id"] not in browser.page_source
    _shot(browser, artifacts, "wrong-key")
    browser.get(f"{stack.url}{CONSOLE}")
    assert browser.current_url.endswith(f"{CONSOLE}/sign-in")


# -- over HTTP: no writes, forms guarded, headers --------------------------------------------


def _form_sign_in(http: httpx.Client, key: str, **headers) -> httpx.Response:
    form = http.get(f"{CONSOLE}/sign-in")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    return http.post(f"{CONSOLE}/sign-in", data={"api_key": key, "csrf": csrf}, headers=headers)


def test_sign_in_is_csrf_safe_and_pages_carry_security_headers(stack, run):
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        r = http.get("/")
        assert r.status_code == 302 and r.headers["location"] == CONSOLE
        r = http.get(f"{CONSOLE}/sign-in")
        assert r.status_code == 200
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        assert "<script>" not in r.text and " style=" not in r.text  # nothing inline for the CSP to allow
        # Without the CSRF cookie's token, or from another origin: refused, no session.
        for data, headers in [({"api_key": API_KEY}, {}), ({"api_key": API_KEY, "csrf": "forged"}, {})]:
            bad = http.post(f"{CONSOLE}/sign-in", data=data, headers=headers)
            assert bad.status_code == 403 and "openrl_console=" not in bad.headers.get("set-cookie", ""), bad.text[:200]
        bad = _form_sign_in(http, API_KEY, Origin="http://evil.example")
        assert bad.status_code == 403 and "openrl_console=" not in bad.headers.get("set-cookie", "")
        assert http.post(f"{CONSOLE}/sign-in", content=b"x" * 10000, headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 413
        assert http.post(f"{CONSOLE}/sign-in", json={"api_key": API_KEY}).status_code == 415
        assert _form_sign_in(http, "tml-wrong").status_code == 401
        # The right key: a cookie that is HttpOnly, SameSite=Strict, scoped to the console.
        ok = _form_sign_in(http, API_KEY)
        assert ok.status_code == 303 and ok.headers["location"] == CONSOLE
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie and API_KEY not in cookie
        page = http.get(CONSOLE)
        assert page.status_code == 200 and run["model_id"] in page.text
        # Read-only: the only forms post to sign-in and sign-out; other methods are refused.
        actions = set(re.findall(r'<form[^>]*action="([^"]+)"', page.text + http.get(f"{CONSOLE}/runs/{run['model_id']}").text))
        assert actions == {f"{CONSOLE}/sign-out"}, actions
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            refused = http.request(method, f"{CONSOLE}/runs/{run['model_id']}")
            assert refused.status_code == 405 and set(refused.headers["allow"].split(",")) == {"GET", "HEAD"} and "http-error" in refused.text
            assert http.request(method, CONSOLE).status_code == 405
        # Bad addresses are pages, not errors: a malformed or unknown run is a 404.
        for bad_run in ("a..b", "a.b", "x" * 300, "s-nope:train:0", "%00"):
            assert http.get(f"{CONSOLE}/runs/{bad_run}").status_code == 404
        assert http.get(f"{CONSOLE}/static/../app.py").status_code == 404
        assert http.get(f"{CONSOLE}/static/console.js").headers["content-type"].startswith("text/javascript")
        # The console is pages for a browser, not API: its routes are not in the OpenAPI document
        # (whose every route the fuzz test attacks expecting JSON errors).
        paths = http.get("/api/v1/openapi.json").json()["paths"]
        assert "/api/v1/training_runs" in paths and not [p for p in paths if p.startswith(CONSOLE)], list(paths)


def test_the_session_cookie_is_not_an_api_credential_and_works_on_every_replica(stack, run, extra_gateway):
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        assert _form_sign_in(http, API_KEY).status_code == 303
        token = http.cookies["openrl_console"]
        # The console's cookie buys nothing on the API...
        assert httpx.get(f"{stack.url}/api/v1/training_runs", headers={"X-API-Key": token}, timeout=30).status_code == 401
        # ...and the API's JWT is no console session.
        jwt = httpx.post(f"{stack.url}/api/v1/auth/token", headers={"X-API-Key": API_KEY}, json={}, timeout=30).json()["jwt"]
        forged = httpx.get(f"{stack.url}{CONSOLE}", cookies={"openrl_console": jwt}, timeout=30)
        assert forged.status_code == 303 and forged.headers["location"] == f"{CONSOLE}/sign-in"
        # Another gateway replica reads the same session (the secret is shared through KV).
        other = httpx.get(f"{extra_gateway}{CONSOLE}", cookies={"openrl_console": token}, timeout=30)
        assert other.status_code == 200 and run["model_id"] in other.text


# -- the step history, without a stack -------------------------------------------------------


def _usage(request_id: str, call: str, seq_id: int, tokens: int = 0, **metrics: float):
    from openrl.bus.messages import UsageRecord

    return UsageRecord(at=1000.0 + seq_id, owner="o", kind="training", tokens=tokens, seconds=0.5, base_model=BASE_MODEL,
                       model_id="s-1:train:0", request_id=request_id, call=call, seq_id=seq_id, metrics=metrics)  # fmt: skip


def test_steps_are_built_from_usage_records_in_sequence_order_once_each():
    from openrl.bus.messages import UsageRecord
    from openrl.gateway.console import curve, histories

    loss = {"loss:sum": 20.0, "tokens:sum": 10.0}
    records = [
        _usage("fb2", "forward_backward", 4, 7, **{"loss:sum": 6.0, "tokens:sum": 6.0}),  # arrives first, applied later
        _usage("fb1a", "forward_backward", 1, 10, **loss),
        _usage("fb1b", "forward_backward", 2, 10, **{"loss:sum": 10.0, "tokens:sum": 10.0}),  # two passes, one step
        _usage("eval", "forward", 3, 99, **{"loss:sum": 1.0, "tokens:sum": 1.0}),  # an evaluation: not a step's
        _usage("opt1", "optim_step", 3, **{"grad_norm:mean": 2.5, "learning_rate:mean": 1e-3}),
        _usage("fb1a", "forward_backward", 1, 10, **loss),  # a trainer's replay after a crash: counted once
        _usage("opt2", "optim_step", 5, **{"grad_norm:mean": 1.5}),
        _usage("fb3", "forward_backward", 6, 5, **{"loss:sum": 1.0, "tokens:sum": 4.0}),  # no optim_step yet
        UsageRecord(at=1.0, owner="o", kind="sampling_sample", tokens=50, seconds=1.0, base_model=BASE_MODEL, model_id="s-1:sample:0"),
    ]
    h = histories(records)["s-1:train:0"]
    assert h.completed == 2 and h.tokens == 10 + 10 + 7 + 5 and h.forward_passes == 1
    assert [(s.number, s.passes, s.tokens, s.loss, s.optim is not None) for s in h.steps] == [
        (1, 2, 20, 30.0 / 20.0, True), (2, 1, 7, 1.0, True), (3, 1, 5, 0.25, False),
    ]  # fmt: skip
    assert h.steps[0].optim == {"grad_norm:mean": 2.5, "learning_rate:mean": 1e-3}
    drawn = curve(h.steps)
    assert drawn["d"].startswith("M") and drawn["d"].count("L") == 2 and [p["step"] for p in drawn["points"]] == [1, 2, 3]
    assert drawn["points"][0]["y"] < drawn["points"][1]["y"] < drawn["points"][2]["y"]  # falling loss, rising y
    assert curve([]) is None and histories([]) == {}
