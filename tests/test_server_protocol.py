"""The websocket server against a stub generator: every message, every error code, limits, auth, origins,
pacing, backpressure, faults, shutdown (stream-protocol.md v1). No model: fast.
"""

from __future__ import annotations

import gc
import io
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref

import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from server.backend import StubBackend
from server.protocol import Limits
from server_helpers import OTHER, PROMPT, Client, Frame, ServerThread

W = H = 32
FPC = 8  # stub frames per chunk


def stub(**kw):
    kw.setdefault("width", W)
    kw.setdefault("height", H)
    kw.setdefault("frames_per_chunk", FPC)
    return StubBackend(**kw)


@pytest.fixture
def srv():
    with ServerThread(stub(delay_s=0.005), max_sessions=4, stats_interval=0.25) as s:
        yield s


# --------------------------------------------------------------------------------------------------------------
# HTTP: the page, healthz, unknown paths
# --------------------------------------------------------------------------------------------------------------


def test_healthz(srv):
    h = srv.health()
    assert h["status"] == "ok" and h["model"] == "stub"
    assert h["sessions"] == 0 and h["max_sessions"] == 4
    with Client(srv.ws_url) as c:
        c.start(pace="max")
        c.until_type("ready")
        assert srv.health()["sessions"] == 1


def test_demo_page_and_assets(srv):
    with urllib.request.urlopen(srv.url + "/") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
        html = r.read().decode()
    assert "<canvas" in html and "/app.js" in html and "/style.css" in html
    for path, ctype in (("/app.js", "javascript"), ("/style.css", "text/css")):
        with urllib.request.urlopen(srv.url + path) as r:
            assert ctype in r.headers["Content-Type"]
            assert len(r.read()) > 500
    for bad in ("/nope", "/../server/app.py", "/%2e%2e/pyproject.toml"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(srv.url + bad)
        e.value.close()
        assert e.value.code == 404


def test_plain_http_to_the_websocket_path_is_refused(srv):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(srv.url + "/v1/stream")
    e.value.close()
    assert e.value.code == 426


# --------------------------------------------------------------------------------------------------------------
# A session from start to done
# --------------------------------------------------------------------------------------------------------------


def test_start_ready_chunks_frames_done(srv):
    n = 20
    with Client(srv.ws_url) as c:
        c.start(seed=3, frames=n, pace="max")
        code = c.drain()
    assert code == 1000
    kinds = [t["type"] for t in c.texts]
    assert kinds[0] == "ready" and kinds[-1] == "done"
    ready = c.texts[0]
    assert set(ready) >= {"session", "width", "height", "fps", "frames_per_chunk", "model"}
    assert (ready["width"], ready["height"], ready["fps"], ready["frames_per_chunk"]) == (W, H, 16, FPC)
    assert isinstance(ready["session"], str) and ready["model"] == "stub"
    # frames: indices 0..n-1 in order, each an 8-byte LE index + a JPEG of the right size
    assert [f.index for f in c.frames] == list(range(n))
    for f in c.frames[:3]:
        img = Image.open(io.BytesIO(f.data))
        assert img.format == "JPEG" and img.size == (W, H)
    # chunk messages come before their frames and describe them
    chunks = c.of_type("chunk")
    assert [ch["index"] for ch in chunks] == list(range(len(chunks)))
    assert sum(ch["frames"] for ch in chunks) == n
    assert [ch["first_frame"] for ch in chunks] == [0, 8, 16]
    for ch in chunks:
        assert ch["prompt"] == PROMPT
        assert isinstance(ch["timings_ms"], dict) and "encode" in ch["timings_ms"]
        assert all(isinstance(v, (int, float)) for v in ch["timings_ms"].values())
    done = c.texts[-1]
    assert done == {**done, "type": "done", "frames": n, "reason": "frames"}


def test_chunk_header_precedes_its_frames(srv):
    with Client(srv.ws_url) as c:
        c.start(frames=24, pace="max")
        seen = []
        try:
            while True:
                m = c.recv()
                seen.append(m)
        except ConnectionClosed:
            pass
    expect = 0
    for m in seen:
        if isinstance(m, dict) and m["type"] == "chunk":
            assert m["first_frame"] == expect
            expect += m["frames"]
        elif isinstance(m, Frame):
            assert m.index < expect, "a frame arrived before its chunk message"


@pytest.mark.parametrize("fmt", ["jpeg", "png", "rgb"])
def test_formats(fmt):
    backend = stub()
    with ServerThread(backend) as s, Client(s.ws_url) as c:
        c.start(frames=3, format=fmt, pace="max", seed=5, quality=100)
        assert c.drain() == 1000
        assert len(c.frames) == 3
        for f in c.frames:
            want = backend.frame(5, PROMPT, f.index)
            if fmt == "rgb":
                assert len(f.data) == W * H * 3
                got = np.frombuffer(f.data, np.uint8).reshape(H, W, 3)
            else:
                img = Image.open(io.BytesIO(f.data))
                assert img.format == fmt.upper() and img.size == (W, H)
                got = np.asarray(img.convert("RGB"))
            if fmt == "jpeg":
                assert np.abs(got.astype(int) - want).mean() < 8
            else:
                assert np.array_equal(got, want)


def test_same_seed_same_frames_other_seed_other_frames(srv):
    def run(seed):
        with Client(srv.ws_url) as c:
            c.start(frames=5, format="rgb", pace="max", seed=seed)
            c.drain()
            return [f.data for f in c.frames]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_unknown_fields_are_ignored(srv):
    with Client(srv.ws_url) as c:
        c.start(frames=2, pace="max", extra={"x": 1}, client="test")
        assert c.drain() == 1000
        assert c.texts[-1]["reason"] == "frames"


# --------------------------------------------------------------------------------------------------------------
# Pacing
# --------------------------------------------------------------------------------------------------------------


def test_realtime_pace_sends_at_the_model_fps():
    with ServerThread(stub(fps=40)) as s, Client(s.ws_url) as c:
        c.start(frames=60, pace="realtime", format="png")
        c.until(lambda m: isinstance(m, Frame))
        t0 = time.monotonic()
        assert c.drain() == 1000
        dt = time.monotonic() - t0
        assert len(c.frames) == 60
        assert 59 / 40 * 0.85 < dt < 59 / 40 * 2.5, dt  # 1.475 s of video: never faster, not much slower


def test_max_pace_is_not_throttled():
    # the queue holds the whole clip: this checks pacing, and a client slowed by a loaded machine must not turn
    # it into a backpressure test (the oldest frames are dropped past the bound: tests/test_server_outbox.py)
    with ServerThread(stub(fps=4), queue_frames=64) as s, Client(s.ws_url) as c:
        c.start(frames=64, pace="max", format="png")
        t0 = time.monotonic()
        assert c.drain() == 1000
        assert len(c.frames) == 64
        assert time.monotonic() - t0 < 64 / 4 / 4  # far faster than 4 fps


def test_realtime_does_not_generate_far_ahead():
    backend = stub(fps=16)
    with ServerThread(backend) as s, Client(s.ws_url) as c:
        c.start(pace="realtime")
        c.until(lambda m: isinstance(m, Frame))
        time.sleep(1.5)
        gen = backend.steps  # steps taken
        # 1.5 s at 16 fps = 24 frames = 3 chunks of 8; the lead allows ~1.5 chunks more
        assert len(gen) <= 3 + 3, len(gen)


# --------------------------------------------------------------------------------------------------------------
# Prompt switch, pause / resume, stop
# --------------------------------------------------------------------------------------------------------------


def test_prompt_switch_applies_at_a_chunk_boundary(srv):
    with Client(srv.ws_url) as c:
        c.start(pace="realtime", format="rgb")
        c.until(lambda m: isinstance(m, Frame) and m.index >= 3)
        c.send({"type": "prompt", "prompt": OTHER})
        applied = c.until_type("prompt_applied")
        nxt = c.until(lambda m: isinstance(m, dict) and m["type"] == "chunk")
        first = c.until(lambda m: isinstance(m, Frame))
        c.send({"type": "stop"})
        c.drain()
    assert applied["prompt"] == OTHER
    assert applied["frame"] % FPC == 0 and applied["frame"] > 0
    assert nxt["first_frame"] == applied["frame"] and nxt["prompt"] == OTHER
    assert first.index == applied["frame"]
    before = [ch for ch in c.of_type("chunk") if ch["first_frame"] < applied["frame"]]
    assert before and all(ch["prompt"] == PROMPT for ch in before)
    # the frames change with the prompt, and the frame count runs on (no reset)
    by_index = {f.index: f.data for f in c.frames}
    k = applied["frame"]
    assert k - 1 in by_index and by_index[k] != by_index[k - 1]
    assert sorted(by_index) == list(range(min(by_index), max(by_index) + 1))


def test_unknown_words_get_a_warning_and_the_prompt_is_still_used():
    """A backend with a closed vocabulary (the Shapes text encoder): a `start` or `prompt` with words it does not know
    gets a `warning` (code unknown_words) naming them and the known words; generation goes on under that prompt; a
    prompt of known words gets none. A backend without one (umT5) never warns (the `srv` stub)."""
    vocab = set(PROMPT.lower().split()) | set(OTHER.lower().split())
    with ServerThread(stub(delay_s=0.005, vocabulary=vocab)) as s, Client(s.ws_url) as c:
        c.start(prompt=PROMPT.replace("red", "rde"), pace="max", format="rgb")
        ready = c.until_type("ready")
        warn = c.until_type("warning")
        assert warn["code"] == "unknown_words" and warn["words"] == ["rde"]
        assert warn["known"] == sorted(vocab) and "'rde'" in warn["message"]
        c.until(lambda m: isinstance(m, Frame))
        c.send({"type": "prompt", "prompt": OTHER + " zzz zzz"})
        assert c.until_type("warning")["words"] == ["zzz"]
        assert c.until_type("prompt_applied")["prompt"] == OTHER + " zzz zzz"
        c.send({"type": "prompt", "prompt": OTHER})
        c.until(lambda m: isinstance(m, dict) and m.get("type") == "prompt_applied" and m["prompt"] == OTHER)
        c.send({"type": "stop"})
        c.drain()
    assert ready["type"] == "ready" and len(c.of_type("warning")) == 2 and not c.of_type("error")


def test_an_open_vocabulary_never_warns(srv):
    with Client(srv.ws_url) as c:
        c.start(prompt="anything at all, qwzx", pace="max", frames=2 * FPC)
        c.drain()
    assert not c.of_type("warning") and c.of_type("done")


def test_pause_stops_frames_and_resume_continues_the_stream(srv):
    with Client(srv.ws_url) as c:
        c.start(pace="max", format="png")
        c.until(lambda m: isinstance(m, Frame) and m.index >= 10)
        c.send({"type": "pause"})
        c.until(lambda m: isinstance(m, dict) and m["type"] == "stats" and m.get("paused"))
        n = len(c.frames)
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            try:
                c.recv(timeout=0.1)
            except TimeoutError:
                pass
        assert len(c.frames) == n, "frames kept coming while paused"
        steps = len(srv.app.backend.steps)
        time.sleep(0.2)
        assert len(srv.app.backend.steps) == steps, "generation went on while paused"
        c.send({"type": "resume"})
        c.until(lambda m: isinstance(m, Frame) and m.index >= c.frames[n - 1].index + 5)
        c.send({"type": "stop"})
        c.drain()
    idx = [f.index for f in c.frames]
    assert idx == list(range(len(idx))), "resume continues the same stream with no gap and no reset"


def test_stop_sends_done_and_closes_1000(srv):
    with Client(srv.ws_url) as c:
        c.start(pace="realtime")
        c.until(lambda m: isinstance(m, Frame))
        c.send({"type": "stop"})
        assert c.drain() == 1000
    done = c.texts[-1]
    assert done["type"] == "done" and done["reason"] == "stop" and done["frames"] == len(c.frames)


def test_stats_every_interval():
    with ServerThread(stub(), stats_interval=0.3) as s, Client(s.ws_url) as c:
        c.start(pace="realtime", format="png")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:
            c.recv()
        stats = c.of_type("stats")
        assert len(stats) >= 4
        st = stats[-1]
        assert set(st) >= {"fps", "frames", "dropped", "latency_ms"}
        assert set(st["latency_ms"]) == {"p50", "p95"}
        assert st["frames"] > 0 and st["dropped"] == 0 and 4 < st["fps"] < 24


# --------------------------------------------------------------------------------------------------------------
# Errors: each gets an `error`, the session lives on
# --------------------------------------------------------------------------------------------------------------

BAD = [
    ("not json", "bad_json", None),
    ("[1, 2]", "bad_json", None),
    ('"start"', "bad_json", None),
    (b"\x00\x01binary", "bad_json", None),
    ({"prompt": PROMPT}, "bad_message", "type"),
    ({"type": 5}, "bad_message", "type"),
    ({"type": "jump"}, "bad_message", "type"),
    ({"type": "start"}, "bad_message", "prompt"),
    ({"type": "start", "prompt": 7}, "bad_message", "prompt"),
    ({"type": "start", "prompt": PROMPT, "seed": "x"}, "bad_message", "seed"),
    ({"type": "start", "prompt": PROMPT, "seed": -1}, "bad_message", "seed"),
    ({"type": "start", "prompt": PROMPT, "seed": 1.5}, "bad_message", "seed"),
    ({"type": "start", "prompt": PROMPT, "seed": True}, "bad_message", "seed"),
    ({"type": "start", "prompt": PROMPT, "frames": -1}, "bad_message", "frames"),
    ({"type": "start", "prompt": PROMPT, "format": "gif"}, "bad_message", "format"),
    ({"type": "start", "prompt": PROMPT, "quality": 0}, "bad_message", "quality"),
    ({"type": "start", "prompt": PROMPT, "quality": 101}, "bad_message", "quality"),
    ({"type": "start", "prompt": PROMPT, "pace": "slow"}, "bad_message", "pace"),
    ({"type": "start", "prompt": ""}, "bad_prompt", "prompt"),
    ({"type": "start", "prompt": "   "}, "bad_prompt", "prompt"),
    ({"type": "start", "prompt": "x" * 2001}, "bad_prompt", "prompt"),
    ({"type": "prompt", "prompt": PROMPT}, "not_started", "prompt"),
    ({"type": "pause"}, "not_started", "pause"),
    ({"type": "resume"}, "not_started", "resume"),
]


@pytest.mark.parametrize("msg,code,field", BAD, ids=[f"{c}-{i}" for i, (_, c, _) in enumerate(BAD)])
def test_bad_messages_get_an_error_and_the_session_lives_on(srv, msg, code, field):
    with Client(srv.ws_url) as c:
        c.send(msg)
        err = c.until_type("error", timeout=10)
        assert err["code"] == code, err
        assert isinstance(err["message"], str) and err["message"]
        if field:
            assert field in err["message"], err
        # still usable: a good start works
        c.start(frames=3, pace="max")
        assert c.drain() == 1000
        assert c.texts[-1]["type"] == "done" and len(c.frames) == 3


def test_errors_mid_stream_do_not_disturb_it(srv):
    with Client(srv.ws_url) as c:
        c.start(pace="max", format="png")
        c.until(lambda m: isinstance(m, Frame))
        c.send({"type": "start", "prompt": PROMPT})
        assert c.until_type("error")["code"] == "already_started"
        c.send({"type": "prompt", "prompt": ""})
        assert c.until_type("error")["code"] == "bad_prompt"
        c.send({"type": "prompt"})
        assert c.until_type("error")["code"] == "bad_message"
        c.send("{")
        assert c.until_type("error")["code"] == "bad_json"
        n = len(c.frames)
        c.until(lambda m: isinstance(m, Frame) and len(c.frames) > n + 10)
        c.send({"type": "stop"})
        assert c.drain() == 1000


def test_prompt_length_limit_is_configurable():
    with ServerThread(stub(), max_sessions=1, limits=Limits(max_prompt_chars=10)) as s, Client(s.ws_url) as c:
        c.start(prompt="x" * 11)
        err = c.until_type("error")
        assert err["code"] == "bad_prompt" and "10" in err["message"]


def test_too_large_message_gets_error_then_1009():
    with ServerThread(stub(), limits=Limits(max_message_bytes=1024)) as s:
        with Client(s.ws_url) as c:  # a huge frame: refused from its header, nothing buffered
            c.send({"type": "start", "prompt": "a" * 100, "pad": "x" * 5000})
            assert c.drain() == 1009
            assert c.texts[-1]["type"] == "error" and c.texts[-1]["code"] == "too_large"
        with Client(s.ws_url) as c:  # just over the limit, mid-stream
            c.start(pace="max", format="png")
            c.until(lambda m: isinstance(m, Frame))
            c.send({"type": "prompt", "prompt": "b" * 1100})
            assert c.drain() == 1009
            assert [t for t in c.texts if t["type"] == "error"][-1]["code"] == "too_large"
        with Client(s.ws_url) as c:  # the server is fine
            c.start(frames=2, pace="max")
            assert c.drain() == 1000
        s.wait(lambda: s.health()["sessions"] == 0, what="sessions released")


def test_busy_at_max_sessions_then_1013():
    with ServerThread(stub(), max_sessions=2) as s:
        a, b = Client(s.ws_url), Client(s.ws_url)
        a.start(pace="max", format="png")
        a.until(lambda m: isinstance(m, Frame))
        with Client(s.ws_url) as c:
            assert c.drain() == 1013
            assert c.texts == [{**c.texts[0], "type": "error", "code": "busy"}]
        b.close()
        s.wait(lambda: s.health()["sessions"] == 1, what="b released")
        with Client(s.ws_url) as c:  # a slot is free again
            c.start(frames=2, pace="max")
            assert c.drain() == 1000
        a.close()


# --------------------------------------------------------------------------------------------------------------
# Token and origins (checked at the handshake, before any model work)
# --------------------------------------------------------------------------------------------------------------


def _status(url, **kw):
    try:
        with connect(url, open_timeout=10, **kw):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def test_token():
    backend = stub()
    with ServerThread(backend, token="s3cret") as s:
        assert _status(s.ws_url) == 401
        assert _status(s.ws_url, additional_headers={"Authorization": "Bearer wrong"}) == 401
        assert _status(s.ws_url + "?token=wrong") == 401
        assert _status(s.ws_url, additional_headers={"Authorization": "Bearer s3cret"}) == 101
        assert _status(s.ws_url + "?token=s3cret") == 101
        assert s.health()["status"] == "ok"  # healthz and the page need no token
        urllib.request.urlopen(s.url + "/").close()
        assert backend.steps == [], "a refused handshake must not cause model work"
        with Client(s.ws_url, additional_headers={"Authorization": "Bearer s3cret"}) as c:
            c.start(frames=2, pace="max")
            assert c.drain() == 1000


def test_origins():
    with ServerThread(stub()) as s:
        port = s.app.port
        assert _status(s.ws_url) == 101  # a non-browser client (no Origin)
        assert _status(s.ws_url, origin=f"http://127.0.0.1:{port}") == 101  # same origin
        assert _status(s.ws_url, origin="http://evil.example") == 403
        assert _status(s.ws_url, origin=f"http://127.0.0.1:{port + 1}") == 403
    with ServerThread(stub(), allowed_origins=("https://app.example",)) as s:
        assert _status(s.ws_url, origin="https://app.example") == 101
        assert _status(s.ws_url, origin="https://other.example") == 403
    with ServerThread(stub(), allowed_origins=("*",)) as s:
        assert _status(s.ws_url, origin="https://anything.example") == 101


# --------------------------------------------------------------------------------------------------------------
# Backpressure, faults, memory, timeouts
# --------------------------------------------------------------------------------------------------------------


def test_slow_client_bounded_memory_and_peers_unaffected():
    # big raw frames fill the socket buffers fast; the slow client stops reading entirely
    backend = stub(width=256, height=256, frames_per_chunk=8, delay_s=0.01)
    with ServerThread(backend, queue_frames=24) as s:
        slow = Client(s.ws_url, max_queue=1)
        slow.start(pace="max", format="rgb")
        slow.until_type("ready")
        s.wait(lambda: len(s.app.sessions) == 1)
        slow_session = next(iter(s.app.sessions))
        fast = Client(s.ws_url)
        fast.start(pace="max", format="rgb")
        s.wait(lambda: len(s.app.sessions) == 2)
        fast_session = next(x for x in s.app.sessions if x is not slow_session)
        t0 = time.monotonic()
        peak = 0
        while time.monotonic() - t0 < 2.0 or slow_session.outbox.dropped == 0:
            fast.recv()
            peak = max(peak, slow_session.outbox.frames)
            assert time.monotonic() - t0 < 30, "the slow client never lost a frame"
        assert peak <= 24, f"the slow client's queue grew to {peak} frames"
        # the fast peer takes everything: nothing dropped, it is served as often as the slow one
        assert fast_session.outbox.dropped == 0
        assert len(fast.frames) > 30
        assert fast_session.generated >= 0.8 * slow_session.generated, (fast_session.generated,
                                                                        slow_session.generated)
        # the slow client reads again: it sees its drops counted, the frame indices skip the dropped ones
        st = slow.until(lambda m: isinstance(m, dict) and m["type"] == "stats" and m["dropped"] > 0)
        assert st["dropped"] > 0
        slow.until(lambda m: isinstance(m, Frame) and m.index + 1 > len(slow.frames))  # a gap: dropped frames
        idx = [f.index for f in slow.frames]
        assert idx == sorted(idx)
        slow.ws.socket.close()
        fast.close()


def test_fault_in_one_session_gets_internal_others_go_on():
    with ServerThread(stub(delay_s=0.005)) as s:
        peers = [Client(s.ws_url) for _ in range(2)]
        for p in peers:
            p.start(pace="max", format="png")
        bad = Client(s.ws_url)
        bad.start(pace="max", format="png")
        bad.until(lambda m: isinstance(m, Frame))
        bad.send({"type": "prompt", "prompt": "a FAULT circle"})
        assert bad.drain() == 1011
        err = [t for t in bad.texts if t["type"] == "error"][-1]
        assert err["code"] == "internal" and "InjectedFault" in err["message"]
        for p in peers:  # the others go on
            n = len(p.frames)
            p.until(lambda m: isinstance(m, Frame) and len(p.frames) > n + 20)
        assert s.health()["status"] == "ok"
        with Client(s.ws_url) as c:
            c.start(frames=3, pace="max")
            assert c.drain() == 1000
        for p in peers:
            p.close()


def test_fault_at_start_gets_internal():
    with ServerThread(stub()) as s, Client(s.ws_url) as c:
        c.start(prompt="FAULT", pace="max")
        assert c.drain() == 1011
        assert c.texts[0]["type"] == "ready" and c.texts[-1]["code"] == "internal"


def test_memory_freed_when_the_client_goes_away():
    backend = stub()
    states = []
    opened = backend.open
    backend.open = lambda spec: states.append(opened(spec)) or states[-1]
    with ServerThread(backend) as s:
        c = Client(s.ws_url)
        c.start(pace="max", format="png")
        c.until(lambda m: isinstance(m, Frame) and m.index > 20)
        ref = weakref.ref(states.pop())
        c.ws.socket.close()  # vanish without a close handshake
        s.wait(lambda: s.health()["sessions"] == 0 and not s.app.scheduler.jobs, 5, "the session to go")
        s.wait(lambda: gc.collect() is not None and ref() is None, 5, "its generation state to be freed")


def test_graceful_shutdown_every_session_gets_done():
    with ServerThread(stub()) as s:
        clients = [Client(s.ws_url) for _ in range(3)]
        for c in clients[:2]:
            c.start(pace="realtime", format="png")
            c.until(lambda m: isinstance(m, Frame))
        results = {}

        def drain(i, c):
            results[i] = c.drain()

        threads = [threading.Thread(target=drain, args=(i, c)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        s.shutdown()
        for t in threads:
            t.join(10)
        assert results == {0: 1000, 1: 1000, 2: 1000}
        for c in clients:
            assert c.texts[-1]["type"] == "done" and c.texts[-1]["reason"] == "stop"


def test_start_timeout_and_pause_timeout():
    with ServerThread(stub(), start_timeout=0.4, pause_timeout=0.4, stats_interval=0.1) as s:
        with Client(s.ws_url) as c:
            assert c.drain(5) == 1000
            assert c.texts[-1] == {**c.texts[-1], "type": "done", "reason": "timeout", "frames": 0}
        with Client(s.ws_url) as c:
            c.start(pace="max", format="png")
            c.until(lambda m: isinstance(m, Frame))
            c.send({"type": "pause"})
            assert c.drain(5) == 1000
            assert c.texts[-1]["type"] == "done" and c.texts[-1]["reason"] == "timeout"


# --------------------------------------------------------------------------------------------------------------
# Scheduling: continuous batching and fairness
# --------------------------------------------------------------------------------------------------------------


def test_sessions_are_batched_and_served_fairly():
    backend = stub(delay_s=0.01)
    with ServerThread(backend, max_batch=8) as s:
        clients = [Client(s.ws_url) for _ in range(4)]
        for c in clients:
            c.start(pace="max", format="png", frames=80)
        for c in clients:
            assert c.drain() == 1000
        assert max(backend.steps) == 4, backend.steps
        assert all(len(c.frames) == 80 for c in clients)


def test_a_new_session_gets_its_first_chunk_in_a_turn_of_its_own():
    backend = stub(delay_s=0.01, per_session_s=0.01)
    with ServerThread(backend) as s:
        busy = [Client(s.ws_url) for _ in range(3)]
        for c in busy:
            c.start(pace="max", format="png")
        for c in busy:
            c.until(lambda m: isinstance(m, dict) and m["type"] == "chunk" and m["batch"] == 3)
        with Client(s.ws_url) as new:
            new.start(pace="max", format="png")
            first = new.until_type("chunk")
            second = new.until_type("chunk")
        for c in busy:
            c.close()
    assert first["index"] == 0 and first["batch"] == 1
    assert second["batch"] >= 3  # then it joins the others' forwards


def test_max_batch_1_runs_sessions_one_at_a_time():
    backend = stub(delay_s=0.002)
    with ServerThread(backend, max_batch=1) as s:
        clients = [Client(s.ws_url) for _ in range(3)]
        for c in clients:
            c.start(pace="max", format="png", frames=40)
        for c in clients:
            assert c.drain() == 1000
        assert set(backend.steps) == {1}


def test_realtime_sessions_fall_into_step_and_share_forwards():
    # real-time sessions started at different moments: those about to need a chunk join the batch of the one
    # that needs it now, so after a moment they are generated together
    backend = stub(fps=16, delay_s=0.01)
    with ServerThread(backend) as s:
        clients = []
        for _ in range(4):
            c = Client(s.ws_url)
            c.start(pace="realtime", format="png")
            clients.append(c)
            time.sleep(0.13)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:
            for c in clients:
                try:
                    c.recv(timeout=0.02)
                except TimeoutError:
                    pass
        late = backend.steps[-4:]
        for c in clients:
            c.send({"type": "stop"})
            c.drain()
            assert c.texts[-1]["dropped"] == 0
    assert min(late) >= 3, backend.steps


def test_fairness_under_contention():
    # more sessions than the batch: least recently served first, so nobody starves
    backend = stub(delay_s=0.01)
    with ServerThread(backend, max_batch=2, max_sessions=6) as s:
        clients = [Client(s.ws_url) for _ in range(5)]
        for c in clients:
            c.start(pace="max", format="png")
        time.sleep(1.5)
        counts = []
        for c in clients:
            c.send({"type": "stop"})
            c.drain()
            counts.append(len(c.frames))
        assert min(counts) > 0.6 * max(counts), counts


# --------------------------------------------------------------------------------------------------------------
# The real process: SIGTERM and command-line errors
# --------------------------------------------------------------------------------------------------------------


def _spawn(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "server", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def test_sigterm_in_a_real_process():
    p = _spawn("--stub", "--port", "0")
    try:
        url = p.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        ws_url = url.replace("http://", "ws://").rstrip("/") + "/v1/stream"
        with Client(ws_url) as c:
            c.start(pace="realtime")
            c.until(lambda m: isinstance(m, Frame))
            p.send_signal(signal.SIGTERM)
            assert c.drain(10) == 1000
            assert c.texts[-1]["type"] == "done" and c.texts[-1]["reason"] == "stop"
        assert p.wait(15) == 0
        err = p.stderr.read()
        assert " start: " in err and " end: " in err, err  # one line per session start and end
    finally:
        if p.poll() is None:
            p.kill()


@pytest.mark.parametrize("args,needle", [
    (["--port", "-1"], "--port"),
    (["--port", "70000"], "--port"),
    (["--max-sessions", "0"], "--max-sessions"),
    (["--max-batch", "0"], "--max-batch"),
    (["--start-timeout", "0"], "--start-timeout must be a positive number"),
    (["--pause-timeout", "nan"], "--pause-timeout must be a positive number"),
    (["--max-session-seconds", "nan"], "--max-session-seconds must be >= 0"),
    (["--allowed-origin", "evil"], "--allowed-origin"),
    (["--stub", "--compile"], "--compile"),
    (["--stub", "--fp8"], "--fp8"),
    (["--stub", "--preview"], "--preview"),
    (["--preview", "no/such/taew2_1.safetensors", "--no-warmup"], "no/such/taew2_1.safetensors"),
    (["--model", "no/such/model-folder"], "no/such/model-folder"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_bad_arguments_exit_2_with_one_line(args, needle):
    p = subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("server: error: ") and needle in p.stderr
