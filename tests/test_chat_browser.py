"""The chat page in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium with explicit paths, so nothing is downloaded at test time): load the page from a real
`minillm serve`, type a prompt, send it, and watch the streamed text appear token by token.
Skipped when Chromium, its driver or Selenium is absent (CI installs them: .ci/run)."""
import shutil
import tempfile

import pytest
from serve_util import Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
    pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium "
                "chromium-driver)", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# Records the output's length at every change, so the test can tell streaming from one final write.
WATCH = """
window.lengths = [];
new MutationObserver(() => {
  const outs = document.querySelectorAll('.output');
  if (outs.length) window.lengths.push(outs[outs.length - 1].textContent.length);
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_chat_page_streams_a_completion(tiny_run, browser):
    server = Server(tiny_run, "--max-new-tokens", 300, cwd=tiny_run.parent)
    try:
        browser.get(server.url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "context 16 tokens" in d.find_element(By.ID, "model").text)  # /health
        browser.execute_script(WATCH)
        browser.find_element(By.ID, "prompt").send_keys("def ")
        browser.execute_script("const t = document.getElementById('temperature'); t.value = 0;"
                               "t.dispatchEvent(new Event('input'));")
        n = browser.find_element(By.ID, "max-tokens")
        n.clear()
        n.send_keys("300")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".turn").get_attribute("data-state")
                   in ("done", "error"))
        turn = browser.find_element(By.CSS_SELECTOR, ".turn")
        meta = turn.find_element(By.CSS_SELECTOR, ".meta").text
        assert turn.get_attribute("data-state") == "done", meta
        shown = turn.find_element(By.CSS_SELECTOR, ".output").get_attribute("textContent")
        status, want = server.request("POST", "/v1/completions",
                                      {"prompt": "def ", "max_tokens": 300, "temperature": 0})
        assert status == 200 and shown == want["text"] and len(shown) == 300
        assert meta.startswith("300 tokens, length")
        lengths = browser.execute_script("return window.lengths")
        growing = sorted(set(x for x in lengths if 0 < x < 300))
        assert len(growing) >= 2, f"the text arrived in one piece, not streamed: {lengths}"
    finally:
        server.kill()
