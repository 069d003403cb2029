"""The chat page at / in headless Chromium, served by `brigade serve` with no model at all.

With no MODEL and no --initial-peers the server starts a local swarm of the embedded tiny model
(chat template included) and stops it on exit; the page must stream an answer from it.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator

import pytest
from brigade_api_testkit import start_api_server, stop_api_server
from brigade_browser import browser_page, chromium_path, screenshot_path

from brigade.kernels.default_model import DEFAULT_MODEL_NAME

# Every text the last answer shows, recorded in the page as it changes.
RECORD_ANSWERS = """() => {
  window.seen = [];
  new MutationObserver(() => {
    const bodies = document.querySelectorAll('.message.assistant .body');
    if (bodies.length) window.seen.push(bodies[bodies.length - 1].textContent);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""

STOP_ON_FIRST_TEXT = """() => {
  const observer = new MutationObserver(() => {
    const bodies = document.querySelectorAll('.message.assistant .body');
    if (bodies.length === 2 && bodies[1].textContent.length > 0) {
      observer.disconnect();
      document.getElementById('stop').click();
    }
  });
  observer.observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    chromium_path()  # skip before starting anything when there is no browser
    log_path = tmp_path_factory.mktemp("serve-default") / "serve.log"
    process, ready = start_api_server(["--port", "0", "--local-peers", "2"], log_path)
    yield ready
    survivors = stop_api_server(process, ready)
    assert process.returncode is not None
    assert survivors == [], f"brigade serve left its local swarm running: {survivors}"


def active_requests(url: str) -> int:
    with urllib.request.urlopen(url + "/health", timeout=5) as response:
        return int(json.load(response)["active"])


def test_chat_page_streams_an_answer(default_server: dict) -> None:
    url = default_server["url"]
    assert default_server["model"] == DEFAULT_MODEL_NAME
    with browser_page() as page:
        page.goto(url + "/")
        page.wait_for_function(f"document.getElementById('model').textContent === '{DEFAULT_MODEL_NAME}'")
        page.evaluate(RECORD_ANSWERS)
        page.fill("#prompt", "read a text file and count its lines")
        page.press("#prompt", "Enter")
        page.wait_for_selector(".message.assistant[data-done='true']", timeout=60_000)

        answer = page.text_content(".message.assistant .body") or ""
        shown = [text for text in dict.fromkeys(page.evaluate("window.seen")) if text]
        assert answer.strip(), "the answer is empty"
        assert len(shown) >= 3, f"the answer should appear piece by piece, saw {shown!r}"
        assert all(answer.startswith(text) for text in shown), "each piece extends the text before it"
        assert "error" not in (page.get_attribute(".message.assistant", "class") or "")
        assert "tokens/s" in (page.text_content(".message.assistant .stats") or "")
        page.screenshot(path=str(screenshot_path("chat_page.png")), full_page=True)

        # Stop mid-answer: the page closes the connection and the server ends the request at once.
        # Greedy, so the answer is long (this model loops rather than ending); Stop is clicked from
        # inside the page on the first piece of text, before the answer can finish.
        page.click("#toggle-settings")
        page.fill("#max-tokens", "300")  # the conversation so far (~150 tokens) plus this fits in 512
        page.fill("#temperature", "0")
        page.fill("#prompt", "now write a class for it")
        page.evaluate(STOP_ON_FIRST_TEXT)
        page.click("#send")
        page.wait_for_selector(".message.assistant:nth-of-type(4)[data-done='true']")
        assert "stopped" in (page.text_content(".message.assistant:nth-of-type(4) .stats") or "")
        deadline = time.monotonic() + 5
        while active_requests(url) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert active_requests(url) == 0, "the stopped request still runs on the server"
