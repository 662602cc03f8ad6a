"""Continuous batching of many streams through one model: the EngineBackend.

Every session keeps its own engine state: a `Stream` (its KVCache of batch 1, its prompt's cross-attention
K/V, its clean-latent history for re-caching), a `StreamingDecoder` and a seeded noise generator, exactly as
`VideoGenerator.run` would for it alone. A step advances each session of a batch by one chunk, in the order
`VideoGenerator.run` uses:

    context  clean pass of the previous chunk (t = 0) -> committed to each session's cache   [batched]
    text     prompt switch: encode, re-cache the context under it                          [per session]
    denoise  the few-step sampler from each session's own noise                              [batched]
    decode   streaming VAE decode (or the preview decoder's), each session with its own state  [batched]

Batched stages run one forward over the sessions that share a *phase* (the same live-context layout for
the transformer, the same decoder-cache layout for the VAE). In steady state every session is in the same
phase, so all of them run together; a session still filling its window (its first 3 chunks) runs with the
others in its phase. Per-sample the arithmetic is the same as running alone; results match the
single-session run up to floating-point reassociation in batched matmuls (tests/test_server_engine.py).

The transformer is batched by `BatchedContext`, an attention context over the sessions' own caches: it
writes each sample's K/V into its cache's current slot and attends to the concatenation of their live
contexts (a copy of a few MB per forward; nothing is pooled, so a session's memory goes with it). The VAE is
batched by concatenating the decoders' per-conv caches along batch and splitting them back afterwards.

A stage that raises for a batch is retried one session at a time (noise generators rewound first), so a
fault lands only on the session that causes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from engine.attention import apply_rope, attention, rope_range
from engine.cache import KVCache
from engine.folder import LoadedModel
from engine.preview import StreamingPreview
from engine.sampler import sample
from engine.stream import Stream
from engine.vae import StreamingDecoder
from engine.video_io import frames_to_uint8

from .backend import ChunkOut, ModelInfo, SessionSpec, Work


class BatchedContext:
    """Attention context of one forward over B sessions: sample i attends through caches[i] (batch 1 each).
    All caches must be in the same phase (same live layout); `phase()` is the grouping key. Follows
    KVCache.attend (dense or block-sparse) and KVCache.memory_readout where the cache has them."""

    def __init__(self, caches: list[KVCache]):
        self.caches = caches
        if len({phase(c) for c in caches}) != 1:
            raise ValueError("BatchedContext: caches in different phases cannot share a forward")

    def attend(self, layer: int, q, k, v):
        if len(self.caches) == 1:  # exactly the single-stream path
            return self.caches[0].attend(layer, q, k, v)
        keys, values = [], []
        for i, c in enumerate(self.caches):
            cur = slice((c.S + c.W) * c.n, (c.S + c.W + c.C) * c.n)
            if k.shape[1] != cur.stop - cur.start:
                raise ValueError(f"chunk has {k.shape[1]} tokens, the cache expects {cur.stop - cur.start}")
            c.k[layer, :, cur] = k[i:i + 1]
            c.v[layer, :, cur] = v[i:i + 1]
            kk, vv = c.context(layer)
            keys.append(kk)
            values.append(vv)
        c = self.caches[0]
        cos, sin = rope_range(c.head_dim, c.live_frames, *c.hw, str(q.device))
        nq = q.shape[1]
        q, keys = apply_rope(q, cos[-nq:], sin[-nq:]), apply_rope(torch.cat(keys), cos, sin)
        if getattr(c.cfg, "sparse_topk", None) is None:
            return attention(q, keys, torch.cat(values))
        return attention(q, keys, torch.cat(values), c.block_table(q, keys))  # per-sample block selection

    def memory_readout(self, layer: int, q):
        if not hasattr(self.caches[0], "memory_readout"):
            return None
        if len(self.caches) == 1:
            return self.caches[0].memory_readout(layer, q)
        outs = [c.memory_readout(layer, q[i:i + 1]) for i, c in enumerate(self.caches)]
        return None if outs[0] is None else torch.cat(outs)


def phase(cache: KVCache) -> tuple:
    """The live layout of a cache: sessions with equal phases can share one forward."""
    return cache.sink_frames, cache.window_frames, getattr(cache, "memory_chunks", 0) > 0


def decoder_phase(dec: StreamingDecoder | StreamingPreview) -> tuple:
    """The layout of a streaming decoder's per-conv caches (None, a marker string, or a tensor's shape)."""
    if isinstance(dec, StreamingPreview):
        return dec.phase()
    sig = tuple(None if e is None else e if isinstance(e, str) else tuple(e.shape[1:]) for e in dec._feat)
    return (dec.latent_frames == 0, sig)


def merge_decoders(decs: list[StreamingDecoder]) -> StreamingDecoder:
    """One decoder whose caches are the given decoders' caches stacked along batch (same decoder_phase)."""
    if isinstance(decs[0], StreamingPreview):
        return StreamingPreview.merge(decs)
    merged = decs[0].v.stream(decs[0].frames_per_call)
    merged.latent_frames = decs[0].latent_frames
    feats = []
    for entries in zip(*(d._feat for d in decs)):
        e0 = entries[0]
        feats.append(e0 if e0 is None or isinstance(e0, str) else torch.cat(entries))
    merged._feat = feats
    return merged


def split_decoder(merged: StreamingDecoder, decs: list[StreamingDecoder]):
    """Write a merged decoder's caches back into the per-session decoders (each its own copy)."""
    if isinstance(merged, StreamingPreview):
        return merged.split(decs)
    for i, d in enumerate(decs):
        d._feat = [e if e is None or isinstance(e, str) else e[i:i + 1].clone() for e in merged._feat]
        d.latent_frames = merged.latent_frames


@dataclass
class EngineState:
    """One session's generation state. Dropping the last reference frees its cache and decoder."""

    stream: Stream
    decoder: StreamingDecoder
    gen: torch.Generator
    prompt: str | None = None  # the prompt in effect
    pending: str | None = None  # the prompt to apply at the next step (the first one, or a switch)
    last: torch.Tensor | None = None  # clean latents of the previous chunk, committed at the next step
    index: int = 0
    frame: int = 0
    # per-step scratch
    clean: torch.Tensor | None = None
    frames: object = None
    changed: bool = False
    t: dict = field(default_factory=dict)
    batch: int = 1


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EngineBackend:
    """The real model behind the server; `max_batch` is enforced by the scheduler (it picks the sessions)."""

    def __init__(self, model: LoadedModel, *, cache_cfg=None, sampler_cfg=None, preview: bool = False):
        """preview: decode with the model's preview decoder (engine/preview.py) instead of the VAE's."""
        self.m = model
        self.decoder = model.vae
        if preview:
            from engine.pipeline import check_preview

            check_preview(model)
            self.decoder = model.preview
        self.preset = model.preset
        self.model = model.transformer
        self.device = model.transformer.proj_out.weight.device
        self.dtype = model.transformer.proj_out.weight.dtype
        self.cache_cfg = cache_cfg or self.preset.cache
        self.sampler_cfg = sampler_cfg or self.preset.sampler
        self.temporal = model.vae.temporal
        self.info = ModelInfo(model.name, self.preset.width, self.preset.height, self.preset.fps,
                              self.cache_cfg.frames_per_chunk * self.temporal)
        self.fault_hook = None  # tests: fault_hook(stage, states) may raise inside a stage

    # ---- sessions -------------------------------------------------------------------------------------------------

    def open(self, spec: SessionSpec) -> EngineState:
        stream = Stream(self.model, self.preset, cache_cfg=self.cache_cfg, sampler_cfg=self.sampler_cfg)
        return EngineState(stream, self.decoder.stream(None), torch.Generator().manual_seed(spec.seed),
                           pending=spec.prompt)

    def warmup(self):
        """Throw-away steps of two sessions, so one-time costs are paid before the first client: two steps, or
        with compiled blocks (server --compile) enough to reach the steady-state shapes (full sink and window)."""
        from engine import accel
        from engine.pipeline import steady_chunks

        a, b = self.open(SessionSpec("", 0)), self.open(SessionSpec("", 1))
        for _ in range(steady_chunks(self.cache_cfg) if accel.is_compiled() else 2):
            for r in self.step([Work(a), Work(b)]):
                if isinstance(r, BaseException):
                    raise r

    def unknown_words(self, prompt: str) -> tuple[list[str], list[str]] | None:
        """The prompt's words the model's text encoder maps to <unk>, and the words it knows (the built-in Shapes
        encoder; None for an open vocabulary such as umT5's)."""
        text = self.m.text
        if not hasattr(text, "unknown_words"):
            return None
        return text.unknown_words(prompt), text.known_words

    # ---- one chunk for every session of `work` --------------------------------------------------------------------

    @torch.no_grad()
    def step(self, work: list[Work]) -> list[ChunkOut | BaseException]:
        sts: list[EngineState] = [w.state for w in work]
        err: dict[int, BaseException] = {}
        for i, (w, st) in enumerate(zip(work, sts)):
            st.clean, st.frames, st.t, st.batch = None, None, {}, 1
            st.changed = w.new_prompt is not None  # a switch the client asked for takes effect at this chunk
            if w.new_prompt is not None:
                st.pending = w.new_prompt

        # 1. context: commit the previous chunk (clean pass at t = 0)
        self._grouped("context", [i for i, s in enumerate(sts) if s.last is not None], sts, err,
                      key=lambda s: phase(s.stream.cache), fn=self._commit, todo=lambda s: s.last is not None)
        # 2. text (+ re-cache mid-stream), per session
        for i, st in enumerate(sts):
            if i in err or st.pending is None:
                continue
            try:
                self._set_prompt(st)
            except Exception as e:  # noqa: BLE001 - one session's fault
                err[i] = e
        # 3. denoise
        live = [i for i in range(len(sts)) if i not in err]
        self._grouped("denoise", live, sts, err, key=lambda s: phase(s.stream.cache), fn=self._denoise,
                      todo=lambda s: s.clean is None, rewind=True)
        # 4. decode
        live = [i for i in range(len(sts)) if i not in err]
        self._grouped("decode", live, sts, err, key=lambda s: decoder_phase(s.decoder), fn=self._decode,
                      todo=lambda s: s.frames is None)

        out: list[ChunkOut | BaseException] = []
        for i, st in enumerate(sts):
            if i in err:
                out.append(err[i])
                continue
            out.append(ChunkOut(st.index, st.frame, st.frames, st.prompt, st.changed,
                                {k: v * 1000 for k, v in st.t.items()}, batch=st.batch))
            st.last, st.clean, st.frames = st.clean, None, None
            st.index += 1
            st.frame += len(out[-1].frames)
        return out

    def _grouped(self, stage, idx, sts, err, *, key, fn, todo, rewind=False):
        groups: dict = {}
        for i in idx:
            groups.setdefault(key(sts[i]), []).append(i)
        for members in groups.values():
            group = [sts[i] for i in members]
            saved = [s.gen.get_state() for s in group] if rewind else None
            try:
                self._timed(stage, group, fn)
                continue
            except Exception as e:  # noqa: BLE001
                if len(members) == 1:
                    err[members[0]] = e
                    continue
            # the batch failed: retry one session at a time so the fault lands only where it belongs
            for j, i in enumerate(members):
                s = sts[i]
                if not todo(s):
                    continue
                if rewind:
                    s.gen.set_state(saved[j])
                try:
                    self._timed(stage, [s], fn)
                except Exception as e:  # noqa: BLE001
                    err[i] = e

    def _timed(self, stage, group, fn):
        if self.fault_hook is not None:
            self.fault_hook(stage, group)
        t0 = time.perf_counter()
        fn(group)
        _sync(self.device)
        dt = time.perf_counter() - t0
        for s in group:
            s.t[stage] = dt
            s.batch = max(s.batch, len(group))

    # ---- stages ---------------------------------------------------------------------------------------------------

    def _forward(self, group: list[EngineState], x, t: float):
        if len(group) == 1:
            return group[0].stream.denoise(x, t)
        tt = torch.full((len(group),), float(t), dtype=torch.float32, device=self.device)
        kvs = [s.stream.text_kv for s in group]
        text_kv = [(torch.cat([kv[layer][0] for kv in kvs]), torch.cat([kv[layer][1] for kv in kvs]))
                   for layer in range(len(kvs[0]))]
        return self.model(x, tt, text_kv=text_kv, ctx=BatchedContext([s.stream.cache for s in group]))

    def _commit(self, group: list[EngineState]):
        if len(group) == 1:
            group[0].stream.commit(group[0].last)
            group[0].last = None
            return
        self._forward(group, torch.cat([s.last for s in group]), 0.0)
        for s in group:  # what Stream.commit does after its forward
            s.stream.cache.commit()
            s.stream._track(s.last)
            s.stream.chunks += 1
            s.last = None

    def _set_prompt(self, st: EngineState):
        t0 = time.perf_counter()
        emb = self.m.text.encode([st.pending])
        st.t["text"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        st.stream.set_prompt(emb)  # re-caches the context when mid-stream
        _sync(self.device)
        if st.index:
            st.t["recache"] = time.perf_counter() - t0
        st.prompt, st.pending = st.pending, None

    def _denoise(self, group: list[EngineState]):
        if len(group) == 1:
            group[0].clean = group[0].stream.sample_chunk(group[0].gen)
            return
        shape = group[0].stream.chunk_shape

        def randn():  # each session draws from its own generator, as it would alone
            return torch.cat([torch.randn(shape, generator=s.gen) for s in group]).to(self.device, self.dtype)

        x0 = sample(lambda x, t: self._forward(group, x, t), randn(), self.sampler_cfg, randn)
        for i, s in enumerate(group):
            s.clean = x0[i:i + 1].clone()

    def _decode(self, group: list[EngineState]):
        if len(group) == 1:
            group[0].frames = frames_to_uint8(group[0].decoder.decode(group[0].clean)[:1].float())
            return
        merged = merge_decoders([s.decoder for s in group])
        video = merged.decode(torch.cat([s.clean for s in group]))
        split_decoder(merged, [s.decoder for s in group])
        for i, s in enumerate(group):
            s.frames = frames_to_uint8(video[i:i + 1].float())
