"""The playground page in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium): it chats through the streaming API, colours tokens by how they were committed, shows
TPF, and renders a screenshot that is not blank."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .conftest import Served

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture()
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (see .ci/run)")
        pytest.skip("needs Debian's chromium and chromium-driver (make browser-deps)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1000,800"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def test_playground_chats_and_colours_tokens(server: Served, browser, tmp_path: Path) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "context" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "temp").clear()
    browser.find_element(By.ID, "temp").send_keys("0")
    box = browser.find_element(By.ID, "maxtok")
    box.clear()
    box.send_keys("40")
    browser.find_element(By.ID, "input").send_keys("Tell me about the sea.")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_element(By.ID, "ntok").text == "40" and d.find_element(By.ID, "send").is_enabled())
    bot = browser.find_element(By.CSS_SELECTOR, ".turn.bot")
    spans = bot.find_elements(By.CSS_SELECTOR, "span.drafted, span.anchor")
    assert spans and bot.text.strip()
    assert float(browser.find_element(By.ID, "tpf").text) >= 1.0
    assert browser.find_element(By.ID, "error").text == ""
    shot = Path(os.environ.get("IDLM_SCREENSHOT_DIR", tmp_path)) / "playground.png"
    browser.save_screenshot(str(shot))
    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100 and len(set(img.get_flattened_data())) > 20  # text and colours, not a blank page
