"""The Shapes world: grammar, parser errors, sampler, renderer geometry (shared/specs/shapes-world.md)."""

import random

import numpy as np
import pytest

from distill.data import ShapesClips, to_tensor, to_uint8
from distill.shapes import (BACKGROUNDS, OBJECT_COLOURS, PromptError, Scene, parse_prompt, render_prompt,
                            sample_spec)


@pytest.mark.parametrize("prompt", [
    "a red circle bouncing on a black background",
    "a large yellow square moving left quickly on a navy background",
    "a small cyan triangle standing still and a magenta circle moving up slowly on a gray background",
])
def test_spec_examples_round_trip(prompt):
    spec = parse_prompt(prompt)
    assert spec.text() == prompt
    assert parse_prompt("  " + prompt.upper() + ".  ") == spec  # case, whitespace, trailing full stop


@pytest.mark.parametrize("prompt, word", [
    ("a red circle moving sideways on a black background", "'sideways'"),
    ("a purple circle bouncing on a black background", "'purple'"),
    ("a red circle standing still slowly on a black background", "'slowly'"),
    ("a red hexagon bouncing on a black background", "'hexagon'"),
    ("a red circle bouncing on a pink background", "'pink'"),
    ("a red circle bouncing and a blue square bouncing and a green circle bouncing on a black background", "'and'"),
    ("a red circle bouncing on a black background please", "'please'"),
])
def test_out_of_grammar_names_the_word_and_the_choices(prompt, word):
    with pytest.raises(PromptError) as e:
        parse_prompt(prompt)
    msg = str(e.value)
    assert word in msg and "expected" in msg and "\n" not in msg


def test_truncated_prompt_and_invisible_object():
    with pytest.raises(PromptError, match="ends early"):
        parse_prompt("a red circle bouncing")
    with pytest.raises(PromptError, match="invisible"):
        parse_prompt("a white circle bouncing on a white background")


def test_sampler_covers_the_grammar():
    rng = random.Random(7)
    specs = [sample_spec(rng) for _ in range(3000)]
    for s in specs[:300]:
        assert parse_prompt(s.text()) == s
    objs = [o for s in specs for o in s.objects]
    assert {o.colour for o in objs} == set(OBJECT_COLOURS)
    assert {s.background for s in specs} == set(BACKGROUNDS)
    assert {o.motion for o in objs} == {"left", "right", "up", "down", "bouncing", "still"}
    assert {o.size for o in objs} == {None, "small", "large"} and {o.speed for o in objs} == {None, "slowly", "quickly"}
    assert all(o.speed is None for o in objs if o.motion == "still")
    assert 0.2 < sum(len(s.objects) == 2 for s in specs) / len(specs) < 0.4
    assert all(OBJECT_COLOURS[o.colour] != BACKGROUNDS[s.background] for s in specs for o in s.objects)


def _mask(frame, bg):
    return np.abs(frame.astype(int) - np.array(BACKGROUNDS[bg])).sum(-1) > 60


@pytest.mark.parametrize("w, h", [(64, 64), (97, 53)])
@pytest.mark.parametrize("shape, ratio", [("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)])
def test_shape_area_and_size(w, h, shape, ratio):
    s = 0.16 * min(w, h)
    v = render_prompt(f"a large red {shape} standing still on a black background", 3, w, h, seed=3)
    assert v.shape == (3, h, w, 3) and v.dtype == np.uint8
    assert (v[0] == v[2]).all()  # standing still
    area = v[0][..., 0].astype(float).sum() / OBJECT_COLOURS["red"][0]  # anti-aliased coverage, on black
    assert area == pytest.approx(ratio * 4 * s * s, rel=0.03)


def test_motion_speed_direction_and_wrap():
    w = 64
    scene = Scene.sample("a small blue square moving right quickly on a gray background", w, w, seed=1)
    (b,) = scene.bodies
    assert (b.vx, b.vy) == pytest.approx((0.03 * w, 0.0))
    frames = scene.render(80)
    xs = [np.nonzero(_mask(f, "gray").any(0))[0] for f in frames]
    assert all(len(x) > 0 for x in xs)  # never leaves: wraps around
    wrapped = [0 in x and w - 1 in x for x in xs]
    assert any(wrapped)  # straddles the edge at some point
    # frame-to-frame continuity across the wrap: the far frame equals a fresh render at that start
    assert (scene.render(1, start=79)[0] == frames[79]).all()


def test_bouncing_stays_inside_and_reflects():
    w, h = 64, 48
    scene = Scene.sample("a large green circle bouncing quickly on a navy background", w, h, seed=5)
    (b,) = scene.bodies
    ang = np.degrees(np.arctan2(abs(b.vy), abs(b.vx)))
    assert 20 <= ang <= 70
    t = np.arange(400.0)
    x, y = b.position(t, w, h)
    assert (x >= b.s - 1e-9).all() and (x <= w - b.s + 1e-9).all() and (y >= b.s - 1e-9).all()
    vx = np.sign(np.diff(x))
    assert (vx[1:] != vx[:-1]).any()  # at least one reflection


def test_two_objects_start_apart_and_second_on_top():
    for seed in range(20):
        sc = Scene.sample("a large red square standing still and a large blue square standing still on a black "
                          "background", 64, 64, seed)
        a, b = sc.bodies
        assert np.hypot(a.x0 - b.x0, a.y0 - b.y0) >= a.s + b.s - 1e-9


def test_clips_are_pure_functions_of_the_index():
    clips = ShapesClips(64, 64, 9, seed=3)
    p1, v1 = clips.clip(11)
    p2, v2 = clips.clip(11)
    assert p1 == p2 and (v1 == v2).all()
    assert clips.clip(12)[0] != p1 or (clips.clip(12)[1] != v1).any()
    x = to_tensor(v1[None])
    assert x.shape == (1, 3, 9, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert (to_uint8(x)[0] == v1).all()
