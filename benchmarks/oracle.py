"""The Shapes-world quality oracle: how well do frames follow a prompt? (shared/specs/shapes-world.md,
"What adherence means").

    report = score_video(frames, "a red circle bouncing on a black background")  # uint8 [T, H, W, 3], 16 fps
    report.score, report.checks, report.failures, report.measured
    python -m benchmarks.oracle video.mp4 --prompt "a red circle moving left on a navy background" [--window 32]

Measuring (`analyse`, prompt-independent, so a long stream is measured once and scored per window):
- background: per frame, the per-channel median of the border pixels (a robust mode: objects never cover
  half the border); its nearest palette entry is the background's name.
- objects: 8-connected regions that differ from the background, on the torus (a shape leaving the right edge
  and re-entering on the left is one region). A region that holds two clearly different palette colours (two
  touching objects) is split by 2-means. Every pixel gets an alpha (where it lies on the line background ->
  region colour), so area, centroid and extents are sub-pixel and survive blur and JPEG.
- colour: nearest object colour, measured along blend lines (small blurred objects lose saturation, not hue).
- shape: nearest template in (fill ratio of the bounding box, vertical skewness, kappa), see SHAPE_FEATURES.
- size: nearest class of s = sqrt(area / (4 * fill of the shape)) / min(W, H), in log space.
Scoring (`_score`): regions are matched per frame to the prompt's objects (colour first, then shape, size and
nearness to the last position; identical-looking objects by how well their motion fits). Checks are fractions
in [0, 1]: background, objects (right count, none missing), per object colour, shape, size, motion and speed,
and temporal: no frozen frames, no copying (a frame equal to an earlier one at a lag that the motion does not
explain, or a straight track that jumps back), no drift (a class that changes half-way). The score is their
mean; a single failed check costs 1/8 for a one-object prompt.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from itertools import permutations
from pathlib import Path

import numpy as np

from distill.shapes import (BACKGROUNDS, DIRECTIONS, FILL_RATIO, OBJECT_COLOURS, SHAPES, SIZES, SPEEDS,
                            PromptError, PromptSpec, parse_prompt)
from engine.cli import OneLineParser

BG_NAMES, BG_RGB = list(BACKGROUNDS), np.array(list(BACKGROUNDS.values()), np.float32)
OBJ_NAMES, OBJ_RGB = list(OBJECT_COLOURS), np.array(list(OBJECT_COLOURS.values()), np.float32)
SIZE_NAMES, SIZE_F = list(SIZES), np.array(list(SIZES.values()))  # None is the medium size
SHAPE_FILL = np.array([FILL_RATIO[s] for s in SHAPES])
# Shape templates in (fill ratio, vertical skewness, kappa), and a tolerance for each feature:
# - fill = area / bounding box: FILL_RATIO, but a triangle measures ~0.1 fuller (its sharp corners add little
#   to the sub-pixel extents).
# - skewness of the mass along y: 0 for circle and square, -2*sqrt(2)/5 = -0.566 for an upward triangle
#   (y points down); JPEG pulls it towards -0.45. It tells triangles apart.
# - kappa = E[dx^2 dy^2] / (E[dx^2] E[dy^2]): 2/3 for a disc, 1 for a square (independent axes), ~0.8 for the
#   triangle. It separates circle and square better than the fill ratio does under JPEG.
# Calibrated on renders of 32 to 96 px: no frame misclassified clean or blurred, ~3% after JPEG quality 75.
SHAPE_FEATURES = np.array([{"circle": (FILL_RATIO["circle"], 0.0, 2 / 3), "square": (FILL_RATIO["square"], 0.0, 1.0),
                            "triangle": (FILL_RATIO["triangle"] + 0.12, -0.45, 0.78)}[s] for s in SHAPES])
SHAPE_TOL = np.array([0.16, 0.12, 0.05])
SPEED_CLASSES = [("still", 0.0)] + sorted(((k or "normal", v) for k, v in SPEEDS.items()), key=lambda kv: kv[1])
SLOW = SPEEDS["slowly"]
MIN_AREA = 0.3 * FILL_RATIO["triangle"] * 4 * min(SIZES.values()) ** 2  # smaller regions are noise (x m^2)
COPY_MAX_LAG = 40  # copies are searched up to this lag (below 50, the wrap period at the normal speed)


@dataclass
class Report:
    score: float  # mean of the checks, 1.0 = perfect
    checks: dict[str, float]  # each a fraction in [0, 1]
    failures: list[str]  # readable, empty when all is well
    measured: dict = field(default_factory=dict)  # background, per-object colour/shape/size/direction/speed...

    def to_dict(self) -> dict:
        return asdict(self)


# ---- measuring --------------------------------------------------------------------------------------


def _torus(d, period):
    """Shortest signed offset(s) on a torus of the given period(s)."""
    return np.mod(d + np.asarray(period) / 2, period) - np.asarray(period) / 2


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of mask [T, H, W] on a torus (per frame) -> a label per True pixel, in C order.
    Union-find in numpy: hook each root onto the smallest neighbouring root, pointer-jump; O(log n) rounds."""
    n = int(mask.sum())
    idx = np.full(mask.shape, -1, np.int64)
    idx[mask] = np.arange(n)
    ps, qs = [], []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        nb = np.roll(idx, (-dy, -dx), axis=(1, 2))  # nb[y, x] = idx[y + dy, x + dx], wrapping at the edges
        both = (idx >= 0) & (nb >= 0)
        ps.append(idx[both]), qs.append(nb[both])
    p, q, parent = np.concatenate(ps), np.concatenate(qs), np.arange(n)
    while p.size:
        lp, lq = parent[p], parent[q]
        open_ = lp != lq  # edges whose ends share a root stay inside one component: drop them
        p, q, lp, lq = p[open_], q[open_], lp[open_], lq[open_]
        np.minimum.at(parent, np.maximum(lp, lq), np.minimum(lp, lq))
        while not np.array_equal(jumped := parent[parent], parent):
            parent = jumped
    return np.unique(parent, return_inverse=True)[1]


def _block_mean(x: np.ndarray, bh: int, bw: int) -> np.ndarray:
    """[T, H, W, 3] -> float32 [T, H // bh, W // bw, 3] block means (strided adds: numpy reduces small axes
    slowly)."""
    T, H, W, _ = x.shape
    x = x[:, :H // bh * bh, :W // bw * bw].reshape(T, H // bh, bh, W // bw, bw, 3)
    return sum(x[:, :, i, :, j].astype(np.float32) for i in range(bh) for j in range(bw)) / (bh * bw)


def _colour_dist(rgb: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Distance [n, palette] from colours [n, 3] (on backgrounds [n, 3]) to each object colour's blend line
    bg + a (colour - bg), a in [0.5, 1.1]: blur and JPEG chroma subsampling desaturate small objects."""
    v, d = OBJ_RGB[None] - bg[:, None], (rgb - bg)[:, None]  # [n, P, 3], [n, 1, 3]
    a = np.clip((d * v).sum(-1) / np.maximum((v * v).sum(-1), 1.0), 0.5, 1.1)
    return np.linalg.norm(d - a[..., None] * v, axis=-1)


def _split(P, xy, core, b, W, H):
    """Pixels [n, 3] of one region (positions xy [n, 2], core mask [n], background b): a boolean mask of the
    second object when the region is two touching objects of different palette colours, else None."""
    pc = P[core]
    u = (pc - b) / np.maximum(np.linalg.norm(pc - b, axis=1, keepdims=True), 1e-6)  # hue seen from the bg
    cen = np.stack([u[0], u[np.argmax(((u - u[0]) ** 2).sum(1))]])
    for _ in range(5):  # 2-means on hue
        lab = ((u[:, None] - cen[None]) ** 2).sum(-1).argmin(1)
        if lab.min() == lab.max():
            return None
        cen = np.stack([u[lab == k].mean(0) for k in (0, 1)])
    if min(np.bincount(lab)) < max(6, 0.03 * len(pc)):
        return None
    v = np.stack([pc[lab == k].mean(0) for k in (0, 1)]) - b  # the two colours, relative to the background
    a = np.clip((v @ v.T) / (v * v).sum(1)[None], 0, 1)  # a[i, j]: colour i projected on bg -> colour j
    res = min(np.linalg.norm(v[0] - a[0, 1] * v[1]), np.linalg.norm(v[1] - a[1, 0] * v[0]))
    cxy = _torus(xy[core] - xy[core][0], (W, H))
    gap = np.linalg.norm(cxy[lab == 0].mean(0) - cxy[lab == 1].mean(0))
    pal = _colour_dist(v + b, np.stack([b, b]))  # [2, palette]
    # one object when a colour is a blend of the other with the background (blur), or JPEG colour fringes:
    # those lie on one line, are concentric, or match no palette colour. Real pairs: res >= 62, gap >= 6.
    if res < 45 or gap < 2.5 or pal.min(1).max() > 40 or pal[0].argmin() == pal[1].argmin():
        return None
    d = P - b  # every pixel (edges too) goes to the colour whose background -> colour line explains it best
    a = np.clip(d @ v.T / (v * v).sum(1), 0, 1)
    return ((d[:, None] - a[..., None] * v[None]) ** 2).sum(-1).argmin(1) == 1


def _analyse_chunk(f: np.ndarray) -> tuple[np.ndarray, dict]:
    """f: float32 [T, H, W, 3] -> (background rgb [T, 3], regions: dict of arrays, one row per region)."""
    T, H, W, _ = f.shape
    bg = np.median(np.concatenate([f[:, 0], f[:, -1], f[:, 1:-1, 0], f[:, 1:-1, -1]], axis=1), axis=1)
    diff = f - bg[:, None, None]
    dist = np.sqrt(np.einsum("thwc,thwc->thw", diff, diff))  # [T, H, W] distance to the background
    mask = dist > max(30.0, 4.0 * float(np.median(dist[:, ::2, ::2])))  # above noise; contrasts are >= 120
    core = mask.copy()  # eroded mask: colours are read away from the anti-aliased edges
    for sh, ax in ((1, 1), (-1, 1), (1, 2), (-1, 2)):
        core &= np.roll(mask, sh, axis=ax)
    seg = _components(mask)
    t, y, x = np.nonzero(mask)
    P, B, cor = f[t, y, x], bg[t], core[t, y, x]
    cw = cor + 1e-4 * (dist[t, y, x] / 255) ** 4  # colour weights: the core, else the strongest pixels

    def colours(lab, n):  # weighted mean colour per label, [n, 3]
        w = np.maximum(np.bincount(lab, cw, n), 1e-12)
        return np.stack([np.bincount(lab, cw * P[:, c], n) for c in range(3)], 1) / w[:, None]

    n = int(seg.max()) + 1 if seg.size else 0
    rgb, ncore = colours(seg, n), np.bincount(seg, cor, n)
    spread = np.sqrt(np.bincount(seg, cor * ((P - rgb[seg]) ** 2).sum(1), n) / np.maximum(ncore, 1))
    group = list(range(n))  # regions split from one connected region share a group: they touch
    for c in np.nonzero((ncore >= 12) & (spread > 30))[0]:  # several colours: maybe two touching objects
        sel = np.nonzero(seg == c)[0]
        second = _split(P[sel], np.stack([x[sel], y[sel]], 1), cor[sel], B[sel[0]], W, H)
        if second is not None:
            seg[sel[second]] = len(group)
            group.append(c)
    n = len(group)
    rgb = colours(seg, n)
    v = rgb[seg] - B
    alpha = np.clip(((P - B) * v).sum(1) / np.maximum((v * v).sum(1), 1.0), 0, 1)
    area = np.bincount(seg, alpha, n)
    out = {"frame": np.zeros(n, np.int64), "area": area, "rgb": rgb, "group": np.array(group, np.int64)}
    out["frame"][seg] = t
    wa, dev = np.maximum(area, 1e-9), {}
    for key, coord, size in (("x", x, W), ("y", y, H)):
        ang = 2 * np.pi * (coord + 0.5) / size  # circular mean first, so a region across the wrap stays whole
        c0 = np.arctan2(np.bincount(seg, alpha * np.sin(ang), n), np.bincount(seg, alpha * np.cos(ang), n))
        c0 = c0 * size / (2 * np.pi)
        d = np.mod(coord + 0.5 - c0[seg] + size / 2, size) - size / 2  # unwrapped offset from c0
        mean = np.bincount(seg, alpha * d, n) / wa
        out[key], dev[key] = np.mod(c0 + mean, size), d - mean[seg]
        mx = np.zeros(n * size)  # extent = sum over columns (rows) of their largest alpha: sub-pixel
        np.maximum.at(mx, seg * size + coord, alpha)
        out["ext_" + key] = mx.reshape(n, size).sum(1)
    mom = lambda val: np.bincount(seg, alpha * val, n) / wa  # alpha-weighted central moments
    vx, vy = mom(dev["x"] ** 2), np.maximum(mom(dev["y"] ** 2), 1e-9)
    out["skew"] = mom(dev["y"] ** 3) / vy ** 1.5
    out["kappa"] = mom(dev["x"] ** 2 * dev["y"] ** 2) / np.maximum(vx * vy, 1e-9)
    order = np.argsort(out["frame"], kind="stable")  # split-off regions were appended: sort rows by frame
    return bg, {key: val[order] for key, val in out.items()}


@dataclass
class Analysis:
    """Per-frame measurements of a clip of T frames: backgrounds, frame signatures and a region table."""
    width: int
    height: int
    bg: np.ndarray  # [T, 3] background colour
    sig: np.ndarray  # [T, D] ~32 x 32 block means of the frames: frozen and copied frames
    coarse: np.ndarray  # [T, d] ~8 x 8 block means: a cheap first test of the same
    regions: dict  # frame, area, rgb, group, x, y, ext_x, ext_y, skew, kappa: one row per region, by frame

    def window(self, a: int, b: int) -> "Analysis":
        lo, hi = np.searchsorted(self.regions["frame"], [a, b])
        reg = {k: v[lo:hi] for k, v in self.regions.items()}
        reg["frame"] = reg["frame"] - a
        return Analysis(self.width, self.height, self.bg[a:b], self.sig[a:b], self.coarse[a:b], reg)


def analyse(frames: np.ndarray, chunk: int = 128) -> Analysis:
    """Measure frames uint8 [T, H, W, 3] (H, W >= 16; big frames are block-averaged to 64..127 px)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 1 or min(frames.shape[1:3]) < 16:
        raise ValueError(f"expected frames [T, H, W, 3] with H, W >= 16, got shape {tuple(frames.shape)}")
    T, H, W, _ = frames.shape
    k = max(1, min(H, W) // 64)
    bgs, regs = [], []
    for a in range(0, T, chunk):
        bg, reg = _analyse_chunk(_block_mean(frames[a:a + chunk], k, k))
        reg["frame"] += a
        bgs.append(bg), regs.append(reg)
    reg = {key: np.concatenate([r[key] for r in regs]) for key in regs[0]}
    keep = reg["area"] >= MIN_AREA * min(H // k, W // k) ** 2
    sig = _block_mean(frames, max(1, H // 32), max(1, W // 32))  # ~32 x 32 block means
    coarse = _block_mean(sig, max(1, sig.shape[1] // 8), max(1, sig.shape[2] // 8))
    return Analysis(W // k, H // k, np.concatenate(bgs), sig.reshape(T, -1), coarse.reshape(T, -1),
                    {key: v[keep] for key, v in reg.items()})


# ---- scoring ----------------------------------------------------------------------------------------


def _mode(idx: np.ndarray, n: int) -> tuple[int, float]:
    """Most common value of idx (ints in [0, n)) and its share."""
    c = np.bincount(idx, minlength=n)
    return int(c.argmax()), float(c.max() / max(len(idx), 1))


def _drifts(idx: np.ndarray, n: int) -> tuple[int, int] | None:
    """(first-half mode, second-half mode) when a per-frame class sequence changes for good, else None."""
    if len(idx) < 8:
        return None
    (m1, s1), (m2, s2) = _mode(idx[:len(idx) // 2], n), _mode(idx[len(idx) // 2:], n)
    return (m1, m2) if m1 != m2 and s1 >= 0.6 and s2 >= 0.6 else None


def _misfit(v: np.ndarray, o, m: int) -> float:
    """How far a velocity v (px/frame) is from what object o should do, in units of 0.01 * m."""
    if o.motion in DIRECTIONS:
        return float(np.hypot(*(v - np.array(DIRECTIONS[o.motion]) * o.speed_factor * m))) / (0.01 * m)
    return abs(float(np.hypot(*v)) - o.speed_factor * m) / (0.01 * m)  # still or bouncing: the speed only


def _identical(an: Analysis, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Frames a and b equal up to noise: fewer than 3 of the ~32 x 32 block means differ by more than 8 levels
    (a slowly moving object changes dozens). The ~8 x 8 means rule most pairs out first."""
    out = np.abs(an.coarse[a] - an.coarse[b]).max(1) < 12
    c = np.nonzero(out)[0]
    out[c] = (np.abs(an.sig[a[c]] - an.sig[b[c]]) > 8).sum(1) < 3
    return out


def _match(an: Analysis, objs, base: np.ndarray, pos: np.ndarray, same_colour: np.ndarray, want_area: np.ndarray):
    """Regions -> prompt objects, per frame. base [n, k]: appearance cost of region j as object i; same_colour
    [n, k]: region j has object i's colour; want_area [k]: px. Returns assign [T, k] (region row or -1), extra
    [T] (unmatched regions), contact and occluded [T, k]."""
    W, H, T, k, r = an.width, an.height, len(an.bg), len(objs), an.regions
    m, starts = min(W, H), np.searchsorted(r["frame"], np.arange(T + 1))
    assign, extra = np.full((T, k), -1), np.zeros(T, bool)
    last, base_l, pos_l = [None] * k, base.tolist(), pos.tolist()  # plain floats: a tight Python loop
    for t in range(T):
        rows = sorted(range(starts[t], starts[t + 1]), key=lambda j: -r["area"][j])[:6]
        cost = {}
        for i in range(k):
            for j in rows:  # appearance, plus the distance to where the object was up to 3 frames ago
                cost[i, j] = base_l[j][i]
                if last[i] is not None and t - last[i][0] <= 3:
                    dx, dy = (abs(a - b) for a, b in zip(pos_l[j], last[i][1]))
                    cost[i, j] += math.hypot(min(dx, W - dx), min(dy, H - dy)) / (0.1 * m)
        best = min(permutations(rows + [None] * k, k),
                   key=lambda combo: sum(100.0 if j is None else cost[i, j] for i, j in enumerate(combo)))
        for i, j in enumerate(best):
            if j is not None:
                assign[t, i], last[i] = j, (t, pos_l[j])
        extra[t] = starts[t + 1] - starts[t] > sum(j is not None for j in best)
    inv = np.unique((r["frame"] << 32) + r["group"], return_inverse=True)[1]
    touching = np.append(np.bincount(inv, minlength=1)[inv] > 1, False)  # row -1 (no region): False
    contact = touching[assign]
    if k == 2:  # identical-looking objects: in each run of frames with the same objects seen apart, keep or
        # swap the pair, whichever fits the prompt's motions (and looks) better
        pattern = np.where(contact.any(1), 0, (assign[:, 0] >= 0) + 2 * (assign[:, 1] >= 0))
        edges = np.flatnonzero(np.diff(pattern, prepend=-1, append=-1))
        for a, b in zip(edges[:-1], edges[1:]):
            fit = [0.0, 0.0]
            for p, perm in enumerate(((0, 1), (1, 0))):
                for i, rows2 in enumerate(assign[a:b][:, perm].T):
                    if pattern[a] and rows2[0] >= 0:
                        fit[p] += base[rows2, i].sum() + (b - a) * (_misfit(np.median(_torus(
                            np.diff(pos[rows2], axis=0), (W, H)), 0), objs[i], m) if b - a >= 2 else 0)
            if fit[1] < fit[0]:
                assign[a:b] = assign[a:b, ::-1]
    # a missing object is hidden by (merged with) another one when it was seen apart elsewhere and is near it
    # now, or when that region has its colour and room for both (same-coloured objects cannot be split); and
    # for the whole stretch of frames that it is missing
    occluded, seen = np.zeros((T, k), bool), np.nonzero((assign >= 0).all(1))[0]
    for i, t in zip(*np.nonzero(assign.T < 0)):
        t2 = seen[np.abs(seen - t).argmin()] if seen.size else -1
        for i2 in np.nonzero(assign[t] >= 0)[0]:
            j2, near = assign[t, i2], (objs[i].size_factor + objs[i2].size_factor + abs(t - t2) * 0.03) * m + 2
            occluded[t, i] |= bool(t2 >= 0 and np.hypot(*_torus(pos[j2] - pos[assign[t2, i]], (W, H))) <= near
                                   or same_colour[j2, i] and r["area"][j2] >= want_area[i2] + 0.5 * want_area[i])
    for i in range(k):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], (assign[:, i] < 0).astype(int), [0]])))
        for a, b in zip(edges[::2], edges[1::2]):
            occluded[a:b, i] = occluded[a:b, i].any()
        contact[occluded[:, i]] |= (assign[occluded[:, i]] >= 0)  # the others are touching it
    return assign, extra, contact, occluded


def _object_checks(o, name, an, cls, rows_all, rows, tt, merged, fails) -> tuple[dict, dict, np.ndarray]:
    """Checks for one object: cls = per-region (colour, shape, size) classes; rows_all = its regions in the
    frames where it was seen; rows = those not touching another object, at frames tt (used for shape, size
    and motion); merged: it is merged with another object most of the time. Returns (checks, measured,
    median velocity in px/frame)."""
    W, H, r = an.width, an.height, an.regions
    m = min(W, H)
    checks, mo = {}, {}
    for c, sel, names, want in (("colour", rows_all, OBJ_NAMES, o.colour), ("shape", rows, list(SHAPES), o.shape),
                                ("size", rows, SIZE_NAMES, o.size)):
        got = cls[c][sel]
        checks[c] = float(np.mean(got == names.index(want)))
        md = names[_mode(got, len(names))[0]]
        mo[c] = md or "medium"
        if checks[c] < 0.5:  # the right class may still be the most frequent one, among three
            fails.append(f"{name}: {c} is {want or 'medium'} in only {checks[c]:.0%} of frames" if md == want else
                         f"{name}: {c} is {md or 'medium'}, expected {want or 'medium'}")
        if (dr := _drifts(got, len(names))) is not None:
            fails.append(f"drifting: {name} {c} changes {names[dr[0]] or 'medium'} -> {names[dr[1]] or 'medium'}")
    mo["rgb"] = r["rgb"][rows_all].mean(0).round(1).tolist()
    mo["s"] = round(float(cls["s"][rows].mean()), 4)
    # motion: steps between consecutive usable detections (<= 3 frames apart), unwrapped across the edges
    gap = np.diff(tt)
    ok_gap = gap <= 3
    raw = np.diff(np.stack([r["x"][rows], r["y"][rows]], 1), axis=0)[ok_gap]
    step = _torus(raw, (W, H)) / gap[ok_gap, None]  # [steps, 2] px/frame
    if not len(step):  # seen apart in one frame only: merged with another object (left out) or a failure
        return checks | ({} if merged else {"motion": 0.0, "speed": 0.0}), mo, np.zeros(2)
    wrapped = np.any(np.abs(raw - _torus(raw, (W, H))) > 1, axis=1)
    mag = np.hypot(step[:, 0], step[:, 1]) / m  # in min(W, H) per frame
    speed, vel = float(np.median(mag)), np.median(step, 0)
    cls_i = int(np.argmin([abs(speed - v) for _, v in SPEED_CLASSES]))
    mo["speed"], mo["speed_class"] = round(speed, 4), SPEED_CLASSES[cls_i][0]
    if o.motion == "still":
        ok = mag < SLOW / 2
    elif o.motion == "bouncing":  # diagonal (>= 10 degrees off both axes), never wraps, turns only at edges
        ok = (mag > SLOW / 4) & (np.min(np.abs(step), 1) >= 0.17 * mag * m) & ~wrapped
        for ax, size, ext in ((0, W, r["ext_x"]), (1, H, r["ext_y"])):
            for f in np.nonzero(step[:-1, ax] * step[1:, ax] < -(0.25 * SLOW * m) ** 2)[0]:
                j = rows[1:][ok_gap][f]  # the detection between the two steps must touch an edge
                c = (r["x"], r["y"])[ax][j]
                if min(c - ext[j] / 2, size - c - ext[j] / 2) > 1.5 + 2 * abs(step[f, ax]):
                    ok[f] = ok[f + 1] = False
        if wrapped.any():
            fails.append(f"{name} wraps around the edge instead of bouncing")
    else:  # steps within 15 degrees of the direction, and the median step within 10 (a bounce is >= 20 off)
        e = np.array(DIRECTIONS[o.motion])
        ok = (mag > SLOW / 4) & (step @ e >= 0.966 * mag * m) & (vel @ e >= 0.985 * np.hypot(*vel))
    checks["motion"] = float(np.mean(ok))
    want = "still" if o.motion == "still" else (o.speed or "normal")
    checks["speed"] = float(SPEED_CLASSES[cls_i][0] == want)
    ang = math.degrees(math.atan2(-vel[1], vel[0]))  # 0 = right, 90 = up
    axis = min(((d, a) for d, a in (("right", 0), ("up", 90), ("left", 180), ("down", -90), ("left", -180))),
               key=lambda da: abs(ang - da[1]))
    mo["direction"] = ("still" if speed < SLOW / 2 else "bouncing" if o.motion == "bouncing" and checks["motion"]
                       >= 0.5 else axis[0] if abs(ang - axis[1]) < 20 else f"diagonal ({ang:.0f} deg)")
    if o.motion != "still" and speed < SLOW / 2:
        fails.append(f"frozen: {name} does not move")
    else:
        if checks["motion"] < 0.7:
            fails.append(f"{name}: moves {mo['direction']} ({checks['motion']:.0%} of steps as asked), expected "
                         f"{'standing still' if o.motion == 'still' else o.motion}")
        if checks["speed"] < 1:
            fails.append(f"{name}: speed {speed:.3f}/frame ({mo['speed_class']}), expected {want}")
    back = (step @ vel < -0.5 * (vel @ vel)) & (o.motion in DIRECTIONS and speed >= SLOW / 2)
    if 0 < back.mean() < 0.25:  # straight motion never steps back: frames repeat earlier ones (even if a codec
        # made them differ slightly)
        t_back = tt[1:][ok_gap][back]
        fails.append(f"copying: {name} jumps back {-(step[back] @ vel).min() / np.hypot(*vel):.1f} px "
                     f"(frame {t_back[0]}{'...' if len(t_back) > 1 else ''})")
    h = len(step) // 2
    if o.motion in DIRECTIONS and h >= 4:  # a turn that the prompt did not ask for
        v1, v2 = np.median(step[:h], 0), np.median(step[h:], 0)
        n1, n2 = np.hypot(*v1), np.hypot(*v2)
        if min(n1, n2) > SLOW * m / 4 and v1 @ v2 < 0.5 * n1 * n2:
            fails.append(f"drifting: {name} changes direction")
    return checks, mo, vel


def _score(an: Analysis, spec: PromptSpec) -> Report:
    W, H, T, r, objs = an.width, an.height, len(an.bg), an.regions, spec.objects
    m, k = min(W, H), len(objs)
    checks, fails, measured = {}, [], {}
    bgi = np.linalg.norm(an.bg[:, None] - BG_RGB[None], axis=-1).argmin(1)  # [T] background per frame
    checks["background"] = float(np.mean(bgi == BG_NAMES.index(spec.background)))
    measured["background"] = BG_NAMES[_mode(bgi, len(BG_NAMES))[0]]
    measured["background_rgb"] = np.median(an.bg, 0).round(1).tolist()
    if measured["background"] != spec.background:
        fails.append(f"background is {measured['background']}, expected {spec.background}")
    # per-region classes
    cdist = _colour_dist(r["rgb"], an.bg[r["frame"]])  # [n, palette]
    fill = r["area"] / np.maximum(r["ext_x"] * r["ext_y"], 1e-9)
    feats = np.stack([fill, r["skew"], r["kappa"]], 1)
    shape = (((feats[:, None] - SHAPE_FEATURES[None]) / SHAPE_TOL) ** 2).sum(-1).argmin(1)
    s_rel = np.sqrt(r["area"] / (4 * SHAPE_FILL[shape])) / m
    cls = {"colour": cdist.argmin(1), "shape": shape, "size": np.abs(np.log(s_rel[:, None] / SIZE_F)).argmin(1),
           "s": s_rel}
    # match: colour first (a palette step is ~2), then shape (1), then size (|log area ratio|, ~0.6 a class)
    want_area = np.array([FILL_RATIO[o.shape] * 4 * (o.size_factor * m) ** 2 for o in objs])
    base = (cdist[:, [OBJ_NAMES.index(o.colour) for o in objs]] / 40
            + (shape[:, None] != np.array([SHAPES.index(o.shape) for o in objs]))
            + np.abs(np.log(np.maximum(r["area"], 1e-9)[:, None] / want_area)))
    same_colour = cdist[:, [OBJ_NAMES.index(o.colour) for o in objs]] < 40
    assign, extra, contact, occluded = _match(an, objs, base, np.stack([r["x"], r["y"]], 1), same_colour, want_area)
    present = (assign >= 0) | occluded
    checks["objects"] = float(np.mean(present.all(1) & ~extra))
    if extra.mean() > 0.2:
        fails.append(f"extra object(s) in {extra.mean():.0%} of frames")
    vel = []
    for i, o in enumerate(objs):
        name = f"object {i + 1} ({o.colour} {o.shape})" if k > 1 else f"the {o.colour} {o.shape}"
        got = assign[:, i] >= 0
        use = got & ~contact[:, i] if (got & ~contact[:, i]).sum() >= 2 else got  # touching: not for shape
        mo = {"detected": float(got.mean())}
        if not got.any():  # never seen apart: merged with another one throughout (its checks cannot be
            # measured, so they are left out), else missing
            merged = occluded[:, i].mean() >= 0.8
            oc = {} if merged else dict.fromkeys(("colour", "shape", "size", "motion", "speed"), 0.0)
            mo["merged"] = float(occluded[:, i].mean())
            if not merged:
                fails.append(f"{name} is missing")
            vel.append(np.zeros(2))
        else:
            if present[:, i].mean() < 0.8:
                fails.append(f"{name} is missing in {1 - present[:, i].mean():.0%} of frames")
            tt = np.nonzero(use)[0]
            oc, mo2, v = _object_checks(o, name, an, cls, assign[got, i], assign[tt, i], tt,
                                        occluded[:, i].mean() >= 0.5, fails)
            mo.update(mo2), vel.append(v)
        measured.setdefault("objects", []).append(mo)
        checks.update({(f"obj{i + 1}.{c}" if k > 1 else c): val for c, val in oc.items()})
    # frozen frames and copied blocks, only where a moving object is in view (one may hide behind another)
    moving = [i for i, o in enumerate(objs) if o.motion != "still"]
    vis = ((assign >= 0) & ~contact)[:, moving].any(1)
    idn = _identical(an, np.arange(T - 1), np.arange(1, T)) & vis[1:] & vis[:-1]
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], idn.astype(int), [0]]))))[::2]
    if moving and T > 1 and (runs.max(initial=0) >= 3 or idn.mean() > 0.25):
        fails.append(f"frozen: {int(idn.sum())} of {T - 1} consecutive frame pairs are identical")
    # copying: frame t equals frame t - L (L >= 2) though the motion (asked or measured) would have moved some
    # object by a pixel or more. A wrap-around period (50 frames at the normal speed) explains a repeat.
    copied = np.zeros(T, bool)
    asked = [np.array(DIRECTIONS[o.motion]) * o.speed_factor * m if o.motion in DIRECTIONS else v
             for o, v in zip(objs, vel)]  # px/frame; bouncing: the measured velocity
    for L in range(2, min(T, COPY_MAX_LAG + 1)) if moving else []:
        if not all(o.motion == "still" or min(np.abs(_torus(u * L, (W, H))).max() for u in (a, v)) < 1.0
                   for o, a, v in zip(objs, asked, vel)):
            copied[L:] |= _identical(an, np.arange(T - L), np.arange(L, T)) & vis[L:] & vis[:-L]
    if np.any(copied[1:] & copied[:-1]):  # a copied block: two or more frames in a row
        fails.append(f"copying: {int(copied.sum())} frames repeat earlier ones (from frame {int(np.argmax(copied))})")
    if (dr := _drifts(bgi, len(BG_NAMES))) is not None:
        fails.append(f"drifting: background changes {BG_NAMES[dr[0]]} -> {BG_NAMES[dr[1]]}")
    if T == 1:  # a still image: motion cannot be measured
        checks = {c: v for c, v in checks.items() if not c.endswith(("motion", "speed"))}
    # one temporal check, so that each failure mode costs as much as one wrong attribute
    checks["temporal"] = 0.0 if any(f.startswith(("frozen", "copying", "drifting")) for f in fails) else 1.0
    measured.update(extra_frames=round(float(extra.mean()), 3), identical_pairs=int(idn.sum()),
                    copied_frames=int(copied.sum()))
    return Report(float(np.mean(list(checks.values()))), checks, fails, measured)


# ---- public API -------------------------------------------------------------------------------------


def score_video(frames: np.ndarray, prompt: str, fps: int = 16) -> Report:
    """Score frames uint8 [T, H, W, 3] against an in-grammar prompt (PromptError otherwise).
    Speeds are per frame at the Shapes world's 16 fps; `fps` is recorded, not used to rescale."""
    spec = parse_prompt(prompt)
    rep = _score(analyse(frames), spec)
    rep.measured["fps"] = fps
    return rep


def _windows(T: int, window: int, stride: int) -> list[tuple[int, int]]:
    if T <= window:
        return [(0, T)]
    return [(a, a + window) for a in range(0, T - window + 1, stride)]


def score_windows(frames: np.ndarray, prompt: str, window: int = 32, stride: int | None = None) -> list[Report]:
    """Score consecutive windows of a long stream (measured once, scored per window)."""
    spec, an = parse_prompt(prompt), analyse(frames)
    return [_score(an.window(a, b), spec) for a, b in _windows(len(an.bg), window, stride or window)]


def score_stream(frames: np.ndarray, schedule: list[tuple[int, str]], window: int = 32, settle: int = 8) -> dict:
    """A stream with prompt switches, schedule [(first_frame, prompt), ...] sorted by frame: windows inside each
    segment (the first `settle` frames after a switch skipped) are scored against the prompt in force."""
    an = analyse(frames)
    T = len(an.bg)
    sched = sorted(schedule)
    if not sched or sched[0][0] > 0:
        raise ValueError("the schedule must start at frame 0")
    specs = [parse_prompt(p) for _, p in sched]
    wins, segs = [], []
    for s, ((a, prompt), spec) in enumerate(zip(sched, specs)):
        b = sched[s + 1][0] if s + 1 < len(sched) else T
        a0 = min(a + (settle if s else 0), b)
        spans = _windows(b - a0, window, window) if b - a0 >= min(window, 8) else []
        scores = []
        for w0, w1 in spans:
            rep = _score(an.window(a0 + w0, a0 + w1), spec)
            wins.append({"start": a0 + w0, "end": a0 + w1, "segment": s, "prompt": prompt, "report": rep})
            scores.append(rep.score)
        segs.append({"start": a, "end": b, "prompt": prompt, "windows": len(scores),
                     "mean": float(np.mean(scores)) if scores else None})
    all_s = [w["report"].score for w in wins]
    return {"windows": wins, "segments": segs, "first": all_s[0] if all_s else None,
            "last": all_s[-1] if all_s else None, "mean": float(np.mean(all_s)) if all_s else None}


def adherence(videos: list[tuple[np.ndarray, str]]) -> float:
    """Mean score over (frames, prompt) pairs: the project's quality metric."""
    return float(np.mean([score_video(v, p).score for v, p in videos])) if videos else float("nan")


def check_means(reports: list[Report]) -> dict[str, float]:
    """Mean of each kind of check over reports ("obj2.colour" counts as "colour"): what a model gets wrong."""
    kinds: dict[str, list[float]] = {}
    for r in reports:
        for name, v in r.checks.items():
            kinds.setdefault(name.split(".")[-1], []).append(v)
    return {k: round(sum(v) / len(v), 3) for k, v in kinds.items()}


def motion_summary(reports: list[Report], prompts: list[str]) -> dict[str, float]:
    """What the DMD ablation compares besides adherence: motion_ratio, the median over moving, detected objects of
    measured speed / asked speed (1 is right; DMD students tend to slow down); frozen_rate and copy_rate, the
    fractions of clips with a frozen or a copying failure."""
    ratios = []
    for rep, prompt in zip(reports, prompts):
        for o, mo in zip(parse_prompt(prompt).objects, rep.measured.get("objects", [])):
            if o.motion != "still" and "speed" in mo:
                ratios.append(mo["speed"] / o.speed_factor)
    n = max(len(reports), 1)
    return {"motion_ratio": round(float(np.median(ratios)), 3) if ratios else float("nan"),
            "frozen_rate": round(sum(any(f.startswith("frozen") for f in r.failures) for r in reports) / n, 3),
            "copy_rate": round(sum(any(f.startswith("copying") for f in r.failures) for r in reports) / n, 3)}


# ---- command line -----------------------------------------------------------------------------------


def read_frames(path: str | Path) -> np.ndarray:
    """A video (PyAV), a GIF or image (PIL) or a folder of PNG frames -> uint8 [T, H, W, 3]."""
    from PIL import Image, ImageSequence
    path = Path(path)
    if path.is_dir():
        frames = [np.asarray(Image.open(f).convert("RGB")) for f in sorted(path.glob("*.png"))]
    elif path.suffix.lower() in (".gif", ".png", ".webp"):
        with Image.open(path) as im:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    else:
        import av
        with av.open(str(path)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    if not frames or len({f.shape for f in frames}) != 1:
        raise ValueError(f"{path}: no frames, or frames of different sizes")
    return np.stack(frames)



def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m benchmarks.oracle", description="Score a Shapes-world video against a prompt.")
    ap.add_argument("video", help="a video file (.mp4, ...), a .gif or a folder of .png frames")
    ap.add_argument("--prompt", required=True, help="the in-grammar prompt the video should follow")
    ap.add_argument("--window", type=int, help="also score windows of N >= 2 frames")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    if args.window is not None and args.window < 2:
        ap.error("--window must be at least 2")
    try:
        parse_prompt(args.prompt)
        try:
            frames = read_frames(args.video)
        except Exception as e:  # PyAV and PIL raise their own types for missing or corrupt media
            raise ValueError(f"cannot read {args.video}: {e}") from e
        rep = score_video(frames, args.prompt)
        wins = score_windows(frames, args.prompt, args.window) if args.window else []
    except (PromptError, ValueError) as e:
        print(f"oracle: error: {(str(e).splitlines() or ['?'])[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rep.to_dict() | {"frames": len(frames)} | ({"windows": [w.to_dict() for w in wins]}
                                                                    if wins else {}), indent=2))
        return 0
    print(f"{args.video}: {len(frames)} frames of {frames.shape[2]}x{frames.shape[1]}, score {rep.score:.3f}")
    print("checks:   " + ", ".join(f"{k} {v:.2f}" for k, v in rep.checks.items()))
    print("measured: " + json.dumps(rep.measured))
    print("failures: " + ("; ".join(rep.failures) or "none"))
    if wins:
        print(f"windows of {args.window}: " + " ".join(f"{w.score:.2f}" for w in wins)
              + f" (mean {np.mean([w.score for w in wins]):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
