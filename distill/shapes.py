"""The Shapes world (spec: shared/specs/shapes-world.md): prompt grammar, scenes and the renderer.

    spec  = parse_prompt("a large yellow square moving left quickly on a navy background")
    scene = Scene.sample(spec, width=64, height=64, seed=3)   # start positions and velocities
    video = scene.render(num_frames=33)                       # uint8 [T, H, W, 3]
    text  = sample_prompt(rng)                                 # a random in-grammar prompt

Everything is a pure function of (prompt, size, seed, frame index): frame 10_000 of a stream renders
without rendering the 9_999 before it, which the oracle tests and the long-stream data rely on.
Positions are object centres in pixels (x right, y down); every shape has half-extent `s`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

FPS = 16

OBJECT_COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (240, 220, 40),
    "cyan": (40, 210, 220), "magenta": (210, 50, 200), "orange": (245, 140, 30), "white": (255, 255, 255),
}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128), "navy": (20, 30, 90)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.09, None: 0.12, "large": 0.16}  # half-extent as a fraction of min(W, H)
SPEEDS = {"slowly": 0.010, None: 0.020, "quickly": 0.030}  # min(W, H) per frame
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
MOTIONS = ("left", "right", "up", "down", "bouncing", "still")
FILL_RATIO = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding-box area

VOCABULARY = sorted({"a", "and", "on", "background", "moving", "bouncing", "standing", "still", "slowly",
                     "quickly", "small", "large", *DIRECTIONS, *OBJECT_COLOURS, *BACKGROUNDS, *SHAPES})


class PromptError(ValueError):
    """A prompt outside the Shapes grammar; the message names the word and what was allowed."""


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str
    motion: str  # one of MOTIONS
    size: str | None = None  # small | large | None (medium)
    speed: str | None = None  # slowly | quickly | None (normal); always None when standing still

    def text(self) -> str:
        words = ["a"] + ([self.size] if self.size else []) + [self.colour, self.shape]
        words += ["standing still"] if self.motion == "still" else (
            ["bouncing"] if self.motion == "bouncing" else ["moving", self.motion])
        return " ".join(words + ([self.speed] if self.speed else []))

    @property
    def size_factor(self) -> float:
        return SIZES[self.size]

    @property
    def speed_factor(self) -> float:
        return 0.0 if self.motion == "still" else SPEEDS[self.speed]


@dataclass(frozen=True)
class PromptSpec:
    objects: tuple[ObjectSpec, ...]
    background: str

    def text(self) -> str:
        return " and ".join(o.text() for o in self.objects) + f" on a {self.background} background"


# ---- grammar ----------------------------------------------------------------------------------------


def normalise(prompt: str) -> list[str]:
    """Case-insensitive words; surrounding whitespace and one trailing full stop are ignored."""
    p = prompt.strip().lower()
    if p.endswith("."):
        p = p[:-1]
    return p.split()


class _Words:
    def __init__(self, words: list[str]):
        self.words, self.i = words, 0

    def peek(self) -> str | None:
        return self.words[self.i] if self.i < len(self.words) else None

    def take(self, allowed, what: str) -> str:
        w = self.peek()
        if w not in allowed:
            opts = ", ".join(sorted(a for a in allowed if a))
            got = f"unexpected word {w!r} (word {self.i + 1})" if w is not None else "the prompt ends early"
            raise PromptError(f"{got}: expected {what} ({opts})")
        self.i += 1
        return w


def parse_prompt(prompt: str) -> PromptSpec:
    """In-grammar prompt -> PromptSpec; anything else raises PromptError naming the unexpected word."""
    w = _Words(normalise(prompt))
    objects = []
    while True:
        w.take({"a"}, "'a'")
        size = w.peek() if w.peek() in ("small", "large") else None
        if size:
            w.i += 1
        colour = w.take(OBJECT_COLOURS.keys(), "a colour" if size else "a size or colour")
        shape = w.take(set(SHAPES), "a shape")
        m = w.take({"moving", "bouncing", "standing"}, "a motion")
        motion = {"bouncing": "bouncing", "standing": "still"}.get(m)
        if m == "moving":
            motion = w.take(set(DIRECTIONS), "a direction")
        elif m == "standing":
            w.take({"still"}, "'still'")
        speed = None
        if motion != "still" and w.peek() in ("slowly", "quickly"):
            speed = w.take({"slowly", "quickly"}, "a speed")
        objects.append(ObjectSpec(colour, shape, motion, size, speed))
        nxt = {"on"} | ({"and"} if len(objects) == 1 else set())
        if motion != "still" and speed is None:
            nxt |= {"slowly", "quickly"}
        if w.take(nxt, "a speed, another object or the background" if len(objects) == 1 else "a speed or the background") == "on":
            break
    w.take({"a"}, "'a'")
    bg = w.take(set(BACKGROUNDS), "a background colour")
    w.take({"background"}, "'background'")
    if w.peek() is not None:
        raise PromptError(f"unexpected word {w.peek()!r} (word {w.i + 1}): expected the end of the prompt")
    for o in objects:
        if OBJECT_COLOURS[o.colour] == BACKGROUNDS[bg]:
            raise PromptError(f"a {o.colour} object on a {bg} background would be invisible: "
                              f"expected an object colour other than {o.colour}")
    return PromptSpec(tuple(objects), bg)


def sample_spec(rng: random.Random, two_objects: float = 0.3) -> PromptSpec:
    """A uniformly random in-grammar prompt (one object, or two with probability `two_objects`)."""
    bg = rng.choice(sorted(BACKGROUNDS))
    objects = []
    for _ in range(2 if rng.random() < two_objects else 1):
        colour = rng.choice([c for c in OBJECT_COLOURS if OBJECT_COLOURS[c] != BACKGROUNDS[bg]])
        motion = rng.choice(MOTIONS)
        speed = None if motion == "still" else rng.choice([None, "slowly", "quickly"])
        objects.append(ObjectSpec(colour, rng.choice(SHAPES), motion, rng.choice([None, "small", "large"]), speed))
    return PromptSpec(tuple(objects), bg)


def sample_prompt(rng: random.Random, two_objects: float = 0.3) -> str:
    return sample_spec(rng, two_objects).text()


# ---- scenes and rendering ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """One object's trajectory: centre x0, y0 (px), velocity vx, vy (px/frame), half-extent s (px)."""
    spec: ObjectSpec
    x0: float
    y0: float
    vx: float
    vy: float
    s: float

    def position(self, t: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Centres at frames t: wrap-around for straight motion, elastic reflection for bouncing."""
        x, y = self.x0 + self.vx * t, self.y0 + self.vy * t
        if self.spec.motion == "bouncing":
            return _reflect(x, self.s, width - self.s), _reflect(y, self.s, height - self.s)
        return np.mod(x, width), np.mod(y, height)


def _reflect(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Position of a point bouncing elastically between lo and hi (a triangle wave)."""
    span = hi - lo
    if span <= 0:
        return np.full_like(p, (lo + hi) / 2)
    u = np.mod(p - lo, 2 * span)
    return lo + np.where(u <= span, u, 2 * span - u)


@dataclass(frozen=True)
class Scene:
    spec: PromptSpec
    width: int
    height: int
    bodies: tuple[Body, ...]

    @classmethod
    def sample(cls, spec: PromptSpec | str, width: int, height: int, seed: int) -> "Scene":
        """Random start positions (uniform where the shape fits, objects >= s1 + s2 apart) and directions."""
        spec = parse_prompt(spec) if isinstance(spec, str) else spec
        rng = random.Random(seed)
        m = min(width, height)
        sizes = [o.size_factor * m for o in spec.objects]
        for _ in range(1000):
            centres = [(rng.uniform(s, width - s), rng.uniform(s, height - s)) for s in sizes]
            if len(centres) < 2 or math.dist(*centres) >= sizes[0] + sizes[1]:
                break
        bodies = []
        for o, s, (x, y) in zip(spec.objects, sizes, centres):
            v = o.speed_factor * m
            if o.motion == "bouncing":
                ang = math.radians(rng.uniform(20.0, 70.0)) + rng.randrange(4) * math.pi / 2
                vx, vy = v * math.cos(ang), v * math.sin(ang)
            elif o.motion == "still":
                vx = vy = 0.0
            else:
                dx, dy = DIRECTIONS[o.motion]
                vx, vy = v * dx, v * dy
            bodies.append(Body(o, x, y, vx, vy, s))
        return cls(spec, width, height, tuple(bodies))

    def render(self, num_frames: int, start: int = 0, supersample: int = 4) -> np.ndarray:
        """Frames start .. start + num_frames - 1 as uint8 [T, H, W, 3], anti-aliased by supersampling."""
        W, H, k = self.width, self.height, supersample
        t = np.arange(start, start + num_frames, dtype=np.float64)
        # sample points at sub-pixel centres; shape tests use the toroidal offset from the object centre
        xs = (np.arange(W * k) + 0.5) / k
        ys = (np.arange(H * k) + 0.5) / k
        img = np.empty((num_frames, H, W, 3), dtype=np.float32)
        img[:] = np.asarray(BACKGROUNDS[self.spec.background], dtype=np.float32)
        for b in self.bodies:
            cx, cy = b.position(t, W, H)
            dx = np.mod(xs[None, :] - cx[:, None] + W / 2, W) - W / 2  # [T, W*k]
            dy = np.mod(ys[None, :] - cy[:, None] + H / 2, H) - H / 2  # [T, H*k]
            cover = _coverage(b.spec.shape, dx[:, None, :], dy[:, :, None], b.s)  # [T, H*k, W*k]
            alpha = cover.reshape(num_frames, H, k, W, k).mean(axis=(2, 4))[..., None]
            img += alpha * (np.asarray(OBJECT_COLOURS[b.spec.colour], dtype=np.float32) - img)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, s: float) -> np.ndarray:
    if shape == "circle":
        return (dx * dx + dy * dy <= s * s).astype(np.float32)
    if shape == "square":
        return ((np.abs(dx) <= s) & (np.abs(dy) <= s)).astype(np.float32)
    # upward-pointing isosceles triangle: apex at dy = -s, base (width 2s) at dy = +s
    return ((dy >= -s) & (dy <= s) & (np.abs(dx) <= (dy + s) / 2)).astype(np.float32)


def render_prompt(prompt: str, num_frames: int, width: int = 64, height: int = 64, seed: int = 0,
                  start: int = 0) -> np.ndarray:
    """Convenience: parse, sample a scene and render frames [T, H, W, 3] uint8."""
    return Scene.sample(prompt, width, height, seed).render(num_frames, start)
