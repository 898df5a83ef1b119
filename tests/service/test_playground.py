"""The playground page (GET /) in a real headless Chromium, driven by selenium through Debian's
chromedriver: it loads from the embedded server, generates digits from the keyboard over the
stream (previews before the images), cancels a streamed generation (counted in /metrics), runs
compare mode, draws both charts, shows the API's own error message, stays within a phone's width,
and logs no console errors. STRIDE_SCREENSHOT=path also writes the screenshot there (the README's is
docs/playground.png)."""
import base64
import os
import re
import shutil

import httpx
import pytest
from service_fixtures import ROOT, ApiServer, metric_value, wait_for

from stride_diffusion.service.settings import Settings

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def api():
    srv = ApiServer(Settings(artifacts=[os.path.join(ROOT, "artifacts", "digits")], steps=[1, 2, 4, 8, 16],
                             threads=1, max_wait_ms=2, max_images=8))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: .ci/run installs chromium and chromium-driver")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900",
              "--force-device-scale-factor=1"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=ChromeService(DRIVER))  # no driver download: Debian's
    yield driver
    driver.quit()


def errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def decoded(driver, css: str) -> list[int]:
    """naturalWidth of every image under `css` once all have finished loading (0 = did not decode)."""
    return WebDriverWait(driver, 10).until(lambda d: d.execute_script(
        "const im = [...document.querySelectorAll(arguments[0])];"
        "return im.length && im.every(i => i.complete) ? im.map(i => i.naturalWidth) : null;", css))


def screenshot(driver, path):
    """The whole page, not just the viewport."""
    w, h = driver.execute_script("return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "clip": {
        "x": 0, "y": 0, "width": w, "height": h, "scale": 1}})
    with open(path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))


def test_playground_in_a_browser(api, browser, tmp_path):
    d, wait = browser, WebDriverWait(browser, 30)
    d.get(api.url + "/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#class-names option")) == 10)
    assert [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#class-names option")] == \
        [str(i) for i in range(10)]
    # every control is labelled (keyboard and screen-reader use)
    assert d.execute_script("return [...document.querySelectorAll('#controls input, #controls select')]"
                            ".filter(e => !e.labels.length).map(e => e.id)") == []

    # the sampler list: auto first, then the samplers measured at this step count with their quality
    Select(d.find_element(By.ID, "steps")).select_by_value("4")
    labels = [o.text for o in Select(d.find_element(By.ID, "solver")).options]
    pick = httpx.get(api.url + "/solvers").json()["models"]["digits"]["steps"]["4"]["solver"]  # the auto-pick
    hi = httpx.get(api.url + "/models").json()["models"][0]["guidance_ranges"][pick][1]
    assert labels[0].startswith(f"auto → {pick}") and any(
        re.match(r"secant-tan-pu — 1\.\d\d× reference FD", t) for t in labels), labels
    assert float(d.find_element(By.ID, "guidance").get_attribute("max")) == hi  # the pick's guidance range

    # generate from the keyboard: type the class, the seed, Enter; the page reads the stream and shows
    # previews (small: the estimate at 16 x 16) in each image's place before the image itself
    d.execute_script(WATCH_IMAGES)
    cls = d.find_element(By.ID, "class")
    cls.clear()
    cls.send_keys("3")
    seed = d.find_element(By.ID, "seed")
    seed.send_keys("12")
    seed.send_keys(Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#images img:not(.preview)")) == 4)
    widths = decoded(d, "#images img")
    assert widths == [128] * 4
    shown = d.execute_script("return window.shown")
    assert [kind for kind, _ in shown].count("image") == 4
    first_image = [kind for kind, _ in shown].index("image")
    assert first_image > 0 and {kind for kind, _ in shown[:first_image]} == {"preview"}, shown
    assert d.execute_script("return performance.getEntriesByType('resource').filter("
                            "e => e.name.endsWith('/generate/stream')).length") == 1
    assert d.find_element(By.ID, "step-bar").get_attribute("value") == "1"
    assert "4 of 4 steps" in d.find_element(By.ID, "progress-text").text
    text = httpx.get(api.url + "/metrics").text
    assert metric_value(text, "stride_stream_requests_total") == 1
    assert metric_value(text, "stride_stream_preview_frames_total") == 4 * 3  # 4 images, steps 1..3
    status = wait.until(lambda d: (t := d.find_element(By.ID, "status").text) and "NFE" in t and t)
    assert re.search(rf"“3” · {re.escape(pick)} · NFE 4 · queue [\d.]+ ms · compute [\d.]+ ms · round trip [\d.]+ ms",
                     status), status

    # compare: one seed and class at 1, 2, 4, 8 steps, each with its latency
    d.find_element(By.ID, "compare").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#compare-row figure")) == 4
               and d.find_element(By.ID, "compare").is_enabled())
    assert decoded(d, "#compare-row img") == [128] * 4
    caps = [f.text for f in d.find_elements(By.CSS_SELECTOR, "#compare-row figcaption")]
    for n, cap in zip((1, 2, 4, 8), caps):
        assert re.search(rf"^{n} steps?\n.+\ncompute [\d.]+ ms\nqueue [\d.]+ ms · total [\d.]+ ms$", cap), cap

    # the charts: measured quality per family (digits has eval.json), observed latency per NFE
    assert len(d.find_elements(By.CSS_SELECTOR, "#quality-chart path.series")) >= 3
    assert "secant-tan-pu" in d.find_element(By.ID, "quality-legend").text
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#latency-chart circle")) >= 10)  # 5 requests, 2 dots
    assert len(d.find_elements(By.CSS_SELECTOR, "#latency-chart path.series")) >= 1  # /metrics means over 4 counts
    assert errors(d) == []

    screenshot(d, tmp_path / "playground.png")
    if os.environ.get("STRIDE_SCREENSHOT"):
        screenshot(d, os.environ["STRIDE_SCREENSHOT"])

    # a bad value: the API's own message, shown to the person
    g = d.find_element(By.ID, "guidance")
    g.clear()
    g.send_keys("99")
    d.find_element(By.ID, "generate").click()
    err = wait.until(lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error").text)
    assert "422" in err and "guidance must be a finite number in [0, 20] (got 99)" in err, err
    # the only console error is Chromium's note of that 422 response
    assert [e for e in errors(d) if not ("/generate" in e["message"] and "422" in e["message"])] == []

    # phone width: nothing wider than the screen
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 1,
                                                             "mobile": True})
    wide = d.execute_script("return [window.innerWidth, [...document.querySelectorAll('body *')]"
                            ".filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)"
                            ".map(e => e.tagName + '#' + e.id)]")
    assert wide == [390, []], wide
    screenshot(d, tmp_path / "playground-phone.png")


# Records, in order, every image the page puts in #images: ("preview" | "image", naturalWidth once loaded).
WATCH_IMAGES = """
window.shown = [];
new MutationObserver((records) => {
  for (const r of records) {
    const imgs = r.type === "attributes" ? [r.target] : [...r.addedNodes].filter((n) => n.tagName === "IMG");
    for (const im of imgs) if (r.type === "childList" || r.attributeName === "src")
      window.shown.push([im.classList.contains("preview") ? "preview" : "image", im.src.length]);
  }
}).observe(document.getElementById("images"), {subtree: true, childList: true, attributes: true,
                                               attributeFilter: ["src"]});
"""


def test_cancel_closes_the_stream_and_the_server_stops_the_work(browser):
    srv = ApiServer(Settings(test_model="gmm:delay_ms=120", steps=[1, 2, 4, 8, 16], threads=1, max_wait_ms=0))
    d, wait = browser, WebDriverWait(browser, 30)
    try:
        d.get(srv.url + "/")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#class-names option")) == 10)
        Select(d.find_element(By.ID, "steps")).select_by_value("16")
        assert not d.find_element(By.ID, "cancel").is_enabled()
        d.find_element(By.ID, "generate").click()
        WebDriverWait(d, 30, poll_frequency=0.02).until(  # 16 steps of 120 ms: cancel well before the end
            lambda d: float(d.find_element(By.ID, "step-bar").get_attribute("value") or 0) > 0)
        assert "of 16" in d.find_element(By.ID, "progress-text").text
        assert d.find_elements(By.CSS_SELECTOR, "#images figure")  # the images' places, before any image
        d.find_element(By.ID, "cancel").click()
        wait.until(lambda d: "Cancelled" in d.find_element(By.ID, "status").text)
        assert d.find_element(By.ID, "generate").is_enabled() and not d.find_element(By.ID, "cancel").is_enabled()

        def counted():
            text = httpx.get(srv.url + "/metrics").text
            return (metric_value(text, "stride_rejected_total", reason="cancelled") == 1
                    and metric_value(text, "stride_worker_results_total", outcome="cancelled") == 1)

        wait_for(counted, 20, "the cancel in /metrics")
        w = srv.service.worker
        wait_for(lambda: w.engine.rows == 0 and not w.tasks, 20, "the rows to leave the batch")
        assert metric_value(httpx.get(srv.url + "/metrics").text, "stride_model_evaluations_total",
                            model="gmm") < 4 * 16
        assert d.find_elements(By.CSS_SELECTOR, "#images img:not(.preview)") == []
        assert errors(d) == []
    finally:
        srv.stop()


def test_with_an_api_key_the_page_asks_for_it(browser):
    """A keyed server: the page shows the 401 in the API's words, opens the key field, and works once
    the key is typed; a model without eval.json says so instead of drawing an empty chart."""
    srv = ApiServer(Settings(test_model="gmm", steps=[1, 2, 4, 8], threads=1, api_key="s3cret"))
    d, wait = browser, WebDriverWait(browser, 30)
    try:
        d.get(srv.url + "/")
        err = wait.until(lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error").text)
        assert err.startswith("401") and "missing or wrong API key" in err
        assert d.find_element(By.ID, "auth").get_attribute("open") is not None
        key = d.find_element(By.ID, "key")
        key.send_keys("s3cret")
        key.send_keys(Keys.TAB)  # change -> reload with the key
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#class-names option")) == 10)
        assert not d.find_element(By.ID, "error").is_displayed()
        assert "no measured quality" in d.find_element(By.ID, "quality-chart").text
        d.find_element(By.ID, "generate").click()  # the stream, with the key
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#images img:not(.preview)")) == 4)
        assert decoded(d, "#images img") == [64] * 4
    finally:
        srv.stop()


def test_page_and_assets_are_served_with_a_same_origin_policy(api):
    r = httpx.get(api.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]  # a CDN link could not load
    for asset in re.findall(r'(?:href|src)="(/[^"]+)"', r.text):
        assert httpx.get(api.url + asset).status_code == 200, asset
