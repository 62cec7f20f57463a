"""The chat page end to end in headless Chromium (Debian's, driven by Playwright): upload an
image, ask, watch the answer stream in; a second turn carries the history; regenerate; clear.

CI installs Chromium (.ci/run); without it this test fails and says how to install it.
"""

from __future__ import annotations

import os
import shutil

import pytest
from playwright.sync_api import expect, sync_playwright
from serve_helpers import TEMPLATE, LiveServer, build_model_dir, png_bytes

from llava_jax.inference.pipeline import Pipeline
from llava_jax.media.image_processing import load_image
from llava_jax.serve import ServeConfig, create_app

MODEL = "tiny-llava"
NEW = 8
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    pipeline = Pipeline.load(build_model_dir(root), template=TEMPLATE, echo=lambda _: None)
    (root / "photo.png").write_bytes(png_bytes(3))
    server = LiveServer(create_app(pipeline, ServeConfig(model_name=MODEL)))
    yield server.url, pipeline, root / "photo.png"
    server.close()


def greedy(pipeline, messages, images) -> str:
    prompt = pipeline.prompt(messages, images)
    sampling = pipeline.stop_config(max_new_tokens=NEW)
    ids = pipeline.generator.generate([prompt], sampling)[0].token_ids
    return pipeline.decode([i for i in ids if i not in sampling.stop_token_ids])


# Records every value the assistant bubbles' text takes (the old value of each change, even
# when several changes land before the observer runs), so the test can tell a streamed answer
# (several growing values) from one written at once.
WATCH = """() => {
  window.seen = [];
  new MutationObserver((records) => {
    for (const r of records) {
      const bubble = r.target.parentElement && r.target.parentElement.closest('.message.assistant');
      if (bubble) window.seen.push(r.oldValue);
    }
  }).observe(document.getElementById('messages'),
             {subtree: true, characterData: true, characterDataOldValue: true});
}"""


def test_chat_page_in_chromium(served):
    url, pipeline, photo = served
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found ({CHROMIUM}); install it with `apt-get install -y "
                    "chromium` (Debian), as .ci/run does")  # fmt: skip
    image = load_image(photo)
    first = greedy(pipeline, [{"role": "user", "content": "<image>\nWhat is in the picture?"}],
                   [image])  # fmt: skip
    turns = [{"role": "user", "content": "<image>\nWhat is in the picture?"},
             {"role": "assistant", "content": first},
             {"role": "user", "content": "Why?"}]  # fmt: skip
    second = greedy(pipeline, turns, [image])

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])  # fmt: skip
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            bodies = []
            page.on("request", lambda r: r.method == "POST" and bodies.append(r.post_data_json))
            page.goto(url + "/")
            expect(page.locator("#model-name")).to_have_text(MODEL)

            page.click("#settings-toggle")
            page.fill("#max-tokens", str(NEW))
            page.set_input_files("#file-input", str(photo))
            expect(page.locator("#attachments img")).to_have_count(1)
            page.evaluate(WATCH)
            page.fill("#prompt", "What is in the picture?")
            page.press("#prompt", "Enter")

            answer = page.locator(".message.assistant").last
            expect(answer).to_have_text(first, timeout=120_000)
            expect(page.locator("#send")).to_be_visible()  # the stream has ended
            seen = [s for s in page.evaluate("window.seen") if s] + [first]
            assert len(set(seen)) >= 2, f"not streamed: the answer was written as {seen}"
            assert all(first.startswith(s) for s in seen), seen
            expect(page.locator(".message.user img")).to_have_count(1)
            expect(page.locator("#attachments img")).to_have_count(0)

            page.fill("#prompt", "Why?")
            page.click("#send")
            expect(page.locator(".message.assistant")).to_have_count(2)
            expect(page.locator(".message.assistant").last).to_have_text(second, timeout=60_000)
            sent = bodies[-1]
            assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
            assert sent["messages"][1]["content"] == first
            assert sent["messages"][0]["content"][0]["type"] == "image_url"
            assert sent["stream"] is True and sent["max_tokens"] == NEW
            assert sent["temperature"] == 0

            expect(page.locator("#regenerate")).to_be_enabled()
            page.click("#regenerate")
            expect(page.locator("#send")).to_be_visible()
            expect(page.locator(".message.assistant")).to_have_count(2)
            expect(page.locator(".message.assistant").last).to_have_text(second)
            assert bodies[-1]["messages"] == sent["messages"]

            page.click("#clear")
            expect(page.locator(".message")).to_have_count(0)
            expect(page.locator("#regenerate")).to_be_disabled()

            # Settings: an empty max-tokens leaves the answer length to the server (which
            # fits it in the context); seed, temperature and top-p are sent as typed.
            page.fill("#max-tokens", "")
            page.fill("#seed", "7")
            page.fill("#temperature", "0.5")
            page.fill("#top-p", "0.9")
            page.fill("#prompt", "Hi")
            page.press("#prompt", "Enter")
            expect(page.locator(".message.assistant")).to_have_count(1)
            expect(page.locator("#send")).to_be_visible(timeout=120_000)
            expect(page.locator("#error")).to_be_hidden()
            sent = bodies[-1]
            assert "max_tokens" not in sent, sent
            assert (sent["seed"], sent["temperature"], sent["top_p"]) == (7, 0.5, 0.9)
            assert not errors, errors
        finally:
            browser.close()


def test_page_shows_server_errors(served):
    """A bad upload (a text file renamed .png) shows the server's message, and the turn comes
    back to the composer for editing."""
    url, _, photo = served
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found ({CHROMIUM}); install it with `apt-get install -y "
                    "chromium` (Debian), as .ci/run does")  # fmt: skip
    bad = photo.parent / "notes.png"
    bad.write_bytes(b"hello, not an image")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])  # fmt: skip
        try:
            page = browser.new_page()
            page.goto(url + "/")
            expect(page.locator("#model-name")).to_have_text(MODEL)
            page.set_input_files("#file-input", {"name": "notes.png", "mimeType": "image/png",
                                                 "buffer": bad.read_bytes()})  # fmt: skip
            page.fill("#prompt", "What is it?")
            page.click("#send")
            expect(page.locator("#error")).to_contain_text("not an image", timeout=60_000)
            expect(page.locator(".message")).to_have_count(0)
            expect(page.locator("#prompt")).to_have_value("What is it?")
            expect(page.locator("#attachments img")).to_have_count(1)
        finally:
            browser.close()
