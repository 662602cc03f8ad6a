"""The send side as pure state: the bounded drop-oldest outbox and the real-time playout clock."""

from __future__ import annotations

import pytest

from server.outbox import Outbox, PlayoutClock
from server.protocol import Limits, ProtocolError, Start, parse_message


def chunk(first, n, applied=False):
    headers = ([("prompt_applied", f"applied@{first}")] if applied else []) + [("chunk", f"chunk@{first}")]
    return headers, [(first + i, b"f%d" % (first + i)) for i in range(n)]


def drain(box: Outbox) -> list:
    out = []
    while True:
        text = box.pop_control()
        if text is not None:
            out.append(text)
            continue
        if box.next_frame_index() is None and not box.chunks:
            return out
        out += box.pop_headers()
        item = box.pop_frame()
        if item is not None:
            out.append(item[0])


def test_order_headers_before_frames_control_first():
    box = Outbox(max_frames=100)
    box.push_chunk(*chunk(0, 3))
    box.push_chunk(*chunk(3, 2, applied=True))
    box.push_control("err")
    assert drain(box) == ["err", "chunk@0", 0, 1, 2, "applied@3", "chunk@3", 3, 4]
    assert box.frames == 0 and box.empty() and box.dropped == 0


def test_full_queue_drops_oldest_frames_and_counts_them():
    box = Outbox(max_frames=5)
    assert box.push_chunk(*chunk(0, 4)) == 0
    assert box.push_chunk(*chunk(4, 4)) == 3
    assert box.frames == 5 and box.dropped == 3
    assert drain(box) == ["chunk@0", 3, "chunk@4", 4, 5, 6, 7]


def test_a_chunk_whose_frames_all_drop_goes_but_its_prompt_applied_stays():
    box = Outbox(max_frames=4)
    box.push_chunk(*chunk(0, 4, applied=True))
    box.push_chunk(*chunk(4, 4))
    assert box.dropped == 4
    assert drain(box) == ["applied@0", "chunk@4", 4, 5, 6, 7]


def test_frames_of_a_chunk_already_started_can_still_drop():
    box = Outbox(max_frames=4)
    box.push_chunk(*chunk(0, 4))
    assert box.pop_headers() == ["chunk@0"] and box.pop_frame()[0] == 0
    box.push_chunk(*chunk(4, 4))
    assert box.frames == 4 and box.dropped == 3
    assert drain(box) == ["chunk@4", 4, 5, 6, 7]


def test_stats_are_replaced_not_queued_and_control_is_bounded():
    box = Outbox(max_frames=4, max_control=3)
    box.push_control("s1", stats=True)
    box.push_control("e1")
    box.push_control("s2", stats=True)
    assert list(t for _, t in box.control) == ["s2", "e1"]
    for i in range(5):
        box.push_control(f"e{i + 2}")
    assert len(box.control) == 3 and box.control_dropped == 4


def test_clear_forgets_frames():
    box = Outbox(max_frames=10)
    box.push_chunk(*chunk(0, 4))
    box.clear()
    assert box.frames == 0 and box.next_frame_index() is None


def test_playout_clock_anchors_paces_and_reanchors_when_late():
    c = PlayoutClock(fps=10)
    assert c.due(0) is None and c.wait(0, 5.0) == 0.0
    c.on_chunk(0, now=100.0)  # first chunk: frame 0 due now
    assert c.due(0) == 100.0 and c.due(10) == pytest.approx(101.0)
    assert c.wait(5, 100.2) == pytest.approx(0.3)
    c.on_chunk(10, now=100.9)  # early: the clock keeps its cadence
    assert c.due(10) == pytest.approx(101.0)
    c.on_chunk(20, now=103.0)  # late (due at 102): re-anchored, no burst to catch up
    assert c.due(20) == 103.0 and c.due(21) == pytest.approx(103.1)
    c.restart(25, now=200.0)  # resume after a pause
    assert c.due(25) == 200.0
    c.restart(None, now=300.0)
    assert c.due(30) is None


def test_parse_start_defaults_and_types():
    m = parse_message('{"type": "start", "prompt": "  a red circle bouncing on a black background  "}')
    assert m == Start(prompt="a red circle bouncing on a black background")
    m = parse_message('{"type": "start", "prompt": "p", "seed": 7.0, "frames": 12, "format": "png", '
                      '"quality": 50, "pace": "max"}')
    assert (m.seed, m.frames, m.format, m.quality, m.pace) == (7, 12, "png", 50, "max")
    with pytest.raises(ProtocolError) as e:
        parse_message('{"type": "start", "prompt": "p"}' + " " * 100, Limits(max_message_bytes=50))
    assert e.value.code == "too_large"
