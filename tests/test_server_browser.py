"""A real browser: headless Chromium (Debian's `chromium`) loads the demo page from the server, starts a
stream with the `tiny` model, sees the canvas change, switches the prompt and sees `prompt_applied`, pauses,
survives a dropped connection (the page reconnects) and stops.

Locally the test is skipped when no Chromium is installed; in CI (CI=true) a missing Chromium is a failure:
.ci/run installs it.
"""

from __future__ import annotations

import os

import pytest
import torch

from engine.folder import load_model_folder
from engine.init_model import random_model_folder
from server.batching import EngineBackend
from server_cdp import Browser, find_chromium
from server_helpers import OTHER, PROMPT, ServerThread

CANVAS_HASH = """(() => {
  const c = document.getElementById('screen');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let h = 0;
  for (let i = 0; i < d.length; i++) h = (Math.imul(h, 31) + d[i]) >>> 0;
  return h;
})()"""


@pytest.fixture(scope="module")
def chromium():
    exe = find_chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is not installed; CI must install Debian's chromium (see .ci/run)")
        pytest.skip("Chromium is not installed (apt-get install chromium); this test runs in CI")
    return exe


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("browser-model") / "tiny"
    random_model_folder("tiny", path, seed=0, weights_dtype=torch.float32)
    return load_model_folder(path)


def test_demo_page_streams_switches_pauses_reconnects_and_stops(chromium, model, tmp_path):
    with ServerThread(EngineBackend(model), stats_interval=0.5) as srv:
        browser = Browser(chromium, str(tmp_path / "profile"))
        try:
            b = browser
            b.navigate(srv.url + "/")
            assert b.evaluate("document.title").startswith("streamgen")
            assert b.evaluate("document.querySelectorAll('#examples .chip').length") >= 3
            assert b.evaluate("document.getElementById('status').textContent") == "Not connected"

            # start a stream
            b.evaluate(f"document.getElementById('prompt').value = {PROMPT!r}; "
                       "document.getElementById('seed').value = '3'; document.getElementById('start').click()")
            b.wait("window.__demo.framesDrawn >= 8", what="frames on the canvas")
            assert b.evaluate("[document.getElementById('screen').width, document.getElementById('screen').height]") \
                == [32, 32]
            assert b.evaluate("document.getElementById('status').textContent") == "Live"
            h0, n0 = b.evaluate(CANVAS_HASH), b.evaluate("window.__demo.framesDrawn")
            b.wait(f"window.__demo.framesDrawn >= {n0 + 6}", what="more frames")
            assert b.evaluate(CANVAS_HASH) != h0, "the canvas did not change"

            # the overlay: fps, frame counter, per-stage latency from chunk.timings_ms
            b.wait("parseFloat(document.getElementById('hud-fps').textContent) > 0", what="the FPS overlay")
            b.wait("document.getElementById('lat-legend').textContent.includes('denoise')", what="latency bars")
            b.wait("window.__demo.stats !== null", what="stats")

            # switch the prompt: prompt_applied arrives and the caption follows
            b.evaluate(f"document.getElementById('prompt').value = {OTHER!r}; "
                       "document.getElementById('switch').click()")
            b.wait(f"window.__demo.events.some(e => e.type === 'prompt_applied' && e.prompt === {OTHER!r})",
                   what="prompt_applied")
            b.wait(f"document.getElementById('caption').textContent === {OTHER!r}", what="the caption")

            # a word the model does not know: a warning in the page's log, and the stream goes on under the prompt
            typo = OTHER.replace("square", "sqaure")
            b.evaluate(f"document.getElementById('prompt').value = {typo!r}; "
                       "document.getElementById('switch').click()")
            b.wait("window.__demo.events.some(e => e.type === 'warning' && e.words.includes('sqaure'))",
                   what="the unknown-word warning")
            b.wait("document.getElementById('log').textContent.includes('unknown_words')",
                   what="the warning in the log")
            b.wait(f"window.__demo.events.some(e => e.type === 'prompt_applied' && e.prompt === {typo!r})",
                   what="the prompt applied all the same")

            # pause: the picture stops; resume: it goes on
            b.evaluate("document.getElementById('pause').click()")
            assert b.evaluate("document.getElementById('status').textContent") == "Paused"
            b.wait("window.__demo.stats && window.__demo.stats.paused", what="the server to pause")
            import time

            time.sleep(0.4)
            n1 = b.evaluate("window.__demo.framesDrawn")
            time.sleep(0.6)
            assert b.evaluate("window.__demo.framesDrawn") == n1, "frames kept coming while paused"
            b.evaluate("document.getElementById('pause').click()")
            b.wait(f"window.__demo.framesDrawn > {n1 + 4}", what="frames after resume")

            # the connection drops: the page reconnects and streams again
            session = next(iter(srv.app.sessions))
            srv.loop.call_soon_threadsafe(session.ws.transport.abort)
            b.wait("window.__demo.events.filter(e => e.type === 'ready').length >= 2", timeout=60,
                   what="the page to reconnect")
            n2 = b.evaluate("window.__demo.framesDrawn")
            b.wait(f"window.__demo.framesDrawn > {n2 + 4}", what="frames after reconnecting")

            # stop
            b.evaluate("document.getElementById('stop').click()")
            b.wait("window.__demo.events.some(e => e.type === 'done' && e.reason === 'stop')", what="done")
            b.wait("document.getElementById('status').textContent === 'Stopped'", what="the Stopped status")
            srv.wait(lambda: srv.health()["sessions"] == 0, what="the server to release the session")
            assert b.exceptions() == [], b.exceptions()
        finally:
            browser.close()
