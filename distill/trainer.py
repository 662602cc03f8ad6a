"""A small trainer with exact resume, shared by the distillation scripts (VAE, teacher, ODE student, DMD).

    cfg = TrainConfig(steps=2000, batch_size=8, lr=3e-4, ema_decay=0.999)
    metrics = Trainer(model, task, cfg, "runs/teacher", device=device).run()   # resumes if it can
    weights = load_weights("runs/teacher")                                     # latest EMA weights

A Task supplies data (`batch`, a pure function of global sample ids) and the loss (all randomness from the
CPU generator it is handed); optimiser, lr schedule, accumulation, DDP, EMA, checkpoints and logs live here.
Resume is exact by construction: micro-batch m of rank r at step s always sees the same ids and the same
generator seed, so a run killed anywhere and resumed from its last checkpoint replays bit for bit.

out/config.json, out/log.jsonl, out/checkpoints/{latest, step_000200/{model,ema,optimizer}.safetensors + state.json}
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm


@dataclass(frozen=True)
class TrainConfig:
    steps: int                      # optimizer steps in total
    batch_size: int = 8             # samples per micro-batch per process
    grad_accum: int = 1             # micro-batches per optimizer step per process
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0       # applied to tensors with dim >= 2 only (not biases / norm gains)
    warmup_steps: int = 0           # linear warm-up, then constant or cosine (to 0 at `steps`)
    lr_schedule: str = "constant"   # constant | cosine
    grad_clip: float | None = 1.0
    ema_decay: float | None = None  # EMA of the weights (kept in fp32), saved alongside
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 0
    keep: int = 2                   # checkpoints kept
    max_minutes: float | None = None  # stop, with a checkpoint, after the first step past this; resume goes on
    amp: str = "none"               # none | bf16: the loss under torch.autocast (weights, optimizer, EMA stay fp32)
    fsdp: bool = False              # under torchrun: shard weights, gradients, optimizer state and EMA (FSDP2)

    def __post_init__(self):
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', not {self.lr_schedule!r}")
        for name in ("batch_size", "grad_accum", "ckpt_every", "log_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or self.warmup_steps < 0:
            raise ValueError("TrainConfig.steps and warmup_steps must be >= 0")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"TrainConfig.amp must be 'none' or 'bf16', not {self.amp!r}")
        # `not x >= 0` rather than `x < 0`: nan fails every comparison and must not pass as a setting
        if self.max_minutes is not None and not self.max_minutes >= 0:
            raise ValueError(f"TrainConfig.max_minutes must be >= 0, got {self.max_minutes}")
        if not (math.isfinite(self.lr) and self.lr >= 0 and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig.lr and weight_decay must be finite and >= 0, got {self.lr} and "
                             f"{self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be positive or None (no clipping), got {self.grad_clip}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"TrainConfig.ema_decay must lie in [0, 1), got {self.ema_decay}")


class Task(Protocol):
    def batch(self, sample_ids: list[int]) -> Any: ...  # pure function of the global sample ids
    def loss(self, model: nn.Module, batch: Any, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]: ...
    # optional: begin_step(step) is called before the micro-batches of each optimizer step (e.g. a task that
    # alternates what it trains, as DMD's critic and generator do); it must depend on the step number only


def lr_at(cfg: TrainConfig, s: int) -> float:
    """Learning rate of optimizer step s (0-based): a pure function of the step, so no scheduler state to save."""
    if s < cfg.warmup_steps:
        return cfg.lr * (s + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        t = (s - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return cfg.lr


def micro_seed(seed: int, step: int, slot: int) -> int:
    # a hash rather than seed+step+slot arithmetic, so neighbouring (step, slot) pairs get unrelated streams
    return int.from_bytes(hashlib.blake2b(f"{seed}/{step}/{slot}".encode(), digest_size=8).digest(), "little") >> 1


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE set) inits the process group: nccl on CUDA, else gloo."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def teardown_distributed() -> None:
    """Ends the process group setup_distributed began (if any), after a barrier, so that no rank tears gloo down
    while another still talks to it. A rank exiting mid-conversation, or with the group still held by a live
    FSDP device mesh, can abort in gloo's thread destructors ("terminate called without an active exception": 2 in
    48 FSDP toy runs under load). So callers drop their trainer first, and what is left of it is collected here."""
    if dist.is_initialized():
        gc.collect()  # what is left of a trainer (FSDP's device mesh holds the process group) goes first
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- files

def _oneline(e: BaseException) -> str:
    return " ".join(str(e).split())[:400]


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # one fresh contiguous CPU copy per entry: safetensors refuses tied/shared storage and strided views
    return {k: torch.empty(v.shape, dtype=v.dtype).copy_(v.detach()) for k, v in tensors.items()}


def _read(path: Path) -> Any:
    """(tensors, metadata) of a .safetensors file, or the content of a .json one."""
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except Exception as e:  # truncated, garbage or missing: name the file, in one line
        raise RuntimeError(f"corrupt or unreadable checkpoint file {path}: {_oneline(e)}") from None


def _load_into(module: nn.Module, path: Path, prefix: str = ""):
    """The file's tensors into module; with a prefix only the keys under it, stripped (an EMA of a submodule; an
    older file's EMA of the whole model reads the same way)."""
    tensors = _read(path)[0]
    if prefix:
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:
        raise RuntimeError(f"{path} does not fit the model: {_oneline(e)}") from None


def _step_of(d: Path) -> int:
    return int(d.name.split("_")[1])


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder `checkpoints/latest` names (else the highest step_* folder), or None if there is none."""
    ck = Path(run_dir) / "checkpoints"
    if (ck / "latest").is_file():
        name = (ck / "latest").read_text().strip()
        if not (ck / name).is_dir():
            raise RuntimeError(f"{ck / 'latest'} names {name!r}, which is not a checkpoint folder")
        return ck / name
    dirs = sorted(ck.glob("step_*"), key=_step_of) if ck.is_dir() else []
    return dirs[-1] if dirs else None


def _in_group(name: str, key: str) -> bool:
    return name.startswith(key) or fnmatch.fnmatchcase(name, key)


def load_weights(run_dir: str | Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """Weights of the latest checkpoint of a run (or of a checkpoint folder); "ema" falls back to "model"."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', not {which!r}")
    run_dir = Path(run_dir)
    ckpt = run_dir if (run_dir / "state.json").exists() else latest_checkpoint(run_dir)
    if ckpt is None:
        raise ValueError(f"no checkpoint in {run_dir}")
    path = ckpt / f"{which}.safetensors"
    return _read(path if path.exists() else ckpt / "model.safetensors")[0]


def _to(x: Any, device: torch.device) -> Any:
    if torch.is_tensor(x):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


# -------------------------------------------------------------------------------------------- trainer

_RESERVED = {"step", "loss", "lr", "grad_norm", "samples/s", "elapsed", "n"}  # task metrics get a task_ prefix


class Trainer:
    """AdamW + lr schedule + grad accumulation + DDP + EMA + atomic checkpoints + jsonl log around a Task.
    The Task's loss gets the DDP wrapper when world > 1: call it (model(...)) so gradients are all-reduced.
    resume=False starts over in `out` (its log and later checkpoints are replaced).
    groups: parameter-name prefix (or fnmatch pattern) -> learning-rate multiplier, for a model that holds several
    networks (DMD's generator and critic): each group gets its own lr and its own gradient clipping, and its grad
    norm is logged as grad_norm_<key>. A parameter joins the first group it matches, in the dict's order. A
    parameter that gets no gradient in a step is left alone by AdamW (no decay either).
    ema_of: the name of the submodule the EMA averages (DMD's "generator": the critic's average is never used, and
    at scale it costs as much memory as the generator's); None averages the whole model. ema.safetensors keeps the
    model's key names ("generator.blocks.0...."), so a run's weights and its EMA read alike.
    frozen: modules the loss uses but nothing trains (DMD's teacher), not part of the model's state: moved to the
    device, or under FSDP sharded like the model (each rank holds 1 / world of them, gathered a block at a time),
    so that a teacher larger than one device's memory fits.
    cfg.fsdp (world > 1): FSDP2 instead of DDP, for models that do not fit one device. Each transformer block (each
    child of a ModuleList named `blocks`) is a unit and the model the root; the EMA is sharded alike. Checkpoints
    hold full tensors in the same files as without FSDP, so a run moves freely between the two."""

    def __init__(self, model: nn.Module, task: Task, cfg: TrainConfig, out: str | Path, *, params=None,
                 device: str | torch.device = "cpu", resume: bool = True, quiet: bool = False,
                 on_step: Callable[[Trainer], None] | None = None, ddp_kwargs: dict | None = None,
                 groups: dict[str, float] | None = None, ema_of: str | None = None,
                 frozen: tuple[nn.Module, ...] = ()):
        self.task, self.cfg, self.out, self.quiet, self.on_step = task, cfg, Path(out), quiet, on_step
        self.device = torch.device(device)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.model = model.to(self.device)
        self.fsdp = cfg.fsdp and self.world > 1
        self.ema, self.ema_prefix = None, f"{ema_of}." if ema_of else ""
        if cfg.ema_decay is not None:  # fp32 so that tiny (1 - decay) updates are not rounded away in bf16
            self.ema = copy.deepcopy(self._averaged()).float().requires_grad_(False).eval()
        ckpt = latest_checkpoint(self.out) if resume else None
        if ckpt is not None:  # full tensors, before any sharding
            self._load_weights(ckpt)
        if self.fsdp:
            for m in (self.model, self.ema):
                if m is not None:
                    _shard(m)
            for m in frozen:  # every rank loaded the same file: nothing to broadcast
                _shard(m.requires_grad_(False), broadcast=False)
        else:
            for m in frozen:
                m.to(self.device)

        names = {id(p): n for n, p in self.model.named_parameters()}
        chosen = self.model.parameters() if params is None else params
        params = list({id(p): p for p in chosen if params is not None or p.requires_grad}.values())
        if groups:
            first = {id(p): next((g for g in groups if _in_group(names.get(id(p), ""), g)), None) for p in params}
            unknown = [names.get(i, "") for i, g in first.items() if g is None]
            if unknown:
                raise ValueError(f"Trainer groups {sorted(groups)} do not cover parameter {unknown[0]!r}")
            parts = [(g, scale, [p for p in params if first[id(p)] == g]) for g, scale in groups.items()]
        else:
            parts = [("", 1.0, params)]
        self.clip_groups = [(g, ps) for g, _, ps in parts]
        # nanoGPT: weight decay on matrices / embeddings only, never on biases and norm gains
        opt_groups = [g for name, scale, ps in parts
                      for g in ({"params": [p for p in ps if p.dim() >= 2], "weight_decay": cfg.weight_decay,
                                 "lr_scale": scale},
                                {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale})
                      if g["params"]]
        self.optimizer = torch.optim.AdamW(opt_groups, lr=cfg.lr, betas=cfg.betas)
        self.params = params
        self.param_names = [[names.get(id(p), f"<external {i}>") for i, p in enumerate(g["params"])]
                            for g in opt_groups]

        self.step, self.elapsed = 0, 0.0
        self._acc: dict[str, float] = {}  # sums since the last log line; saved so a resumed log matches exactly
        if ckpt is not None:
            self._load_state(ckpt)
        self.last = self._read_log()
        if self.rank == 0:
            self._prepare_out()
        self.ddp = None
        if self.world > 1 and not self.fsdp:  # DDP broadcasts rank 0's weights, so every rank starts identical
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=ids, **(ddp_kwargs or {}))
            dist.barrier()

    def _out_of_time(self, t_start: float) -> bool:
        """max_minutes passed since run() began (rank 0's clock decides, so all ranks stop at the same step)."""
        late = torch.tensor([float(time.perf_counter() - t_start >= 60.0 * self.cfg.max_minutes)], device=self.device)
        if self.world > 1:
            dist.broadcast(late, 0)
        return bool(late.item())

    # ------------------------------------------------------------------------------------ checkpoints
    def _load_weights(self, ckpt: Path):
        _read(ckpt / "state.json")  # a broken checkpoint is named by its first bad file, state.json first
        _load_into(self.model, ckpt / "model.safetensors")
        if self.ema is not None:  # EMA switched on mid-run: start it from the weights
            ema = ckpt / "ema.safetensors"
            _load_into(self.ema, ema if ema.exists() else ckpt / "model.safetensors", self.ema_prefix)

    def _load_state(self, ckpt: Path):
        """Optimizer state, step, time and log sums (after the optimizer exists; the weights came first)."""
        state = _read(ckpt / "state.json")
        tensors, meta = _read(ckpt / "optimizer.safetensors")
        try:
            meta = json.loads(meta["optimizer"])
        except Exception as e:
            raise RuntimeError(f"corrupt checkpoint file {ckpt / 'optimizer.safetensors'}: metadata {_oneline(e)}") from None
        if meta["param_names"] != self.param_names:
            raise ValueError(f"{ckpt / 'optimizer.safetensors'} was saved for other parameters than this optimizer's")
        opt_state = {int(i): dict(values) for i, values in meta["state"].items()}
        for key, t in tensors.items():
            i, name = key.split(".", 1)
            opt_state.setdefault(int(i), {})[name] = t
        # hyper-parameters come from the current cfg (lr is set every step anyway), only the state is restored
        if self.fsdp:  # the same full state keyed by parameter name; every rank keeps its own shard of it
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            flat = [n for g in self.param_names for n in g]
            groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names}
                      for g, names in zip(self.optimizer.param_groups, self.param_names)]
            set_optimizer_state_dict(self.model, self.optimizer, {"state": {flat[i]: st for i, st in opt_state.items()},
                                     "param_groups": groups}, options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict({"state": opt_state,
                                            "param_groups": self.optimizer.state_dict()["param_groups"]})
        self.step, self.elapsed, self._acc = state["step"], state.get("elapsed", 0.0), state.get("log_acc", {})

        old, new, old_world = state["config"], json.loads(json.dumps(asdict(self.cfg))), state.get("world_size", 1)
        breaking = [f"{k} {old.get(k)} -> {new[k]}" for k in ("batch_size", "seed") if old.get(k) != new[k]]
        if old.get("grad_accum", 1) * old_world != self.cfg.grad_accum * self.world:
            breaking.append(f"grad_accum*world {old.get('grad_accum')}*{old_world} -> {self.cfg.grad_accum}*{self.world}")
        if breaking:
            warnings.warn(f"resuming {ckpt} with a changed {'; '.join(breaking)}: data and noise after step "
                          f"{self.step} will differ from the original run (not an exact resume)", stacklevel=3)

    def _read_log(self) -> dict:
        """Log lines up to the current step (later ones belong to work lost with a kill); returns the last."""
        self._log_lines, path = [], self.out / "log.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if rec.get("step", math.inf) <= self.step:
                    self._log_lines.append(line)
        return json.loads(self._log_lines[-1]) if self._log_lines else {}

    def _prepare_out(self):
        ck = self.out / "checkpoints"
        try:
            ck.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.out / "config.json", json.dumps({**asdict(self.cfg), "world_size": self.world}, indent=2))
            _write_atomic(self.out / "log.jsonl", "".join(line + "\n" for line in self._log_lines))
            for d in ck.glob(".tmp_*"):  # a save interrupted by a kill
                shutil.rmtree(d, ignore_errors=True)
            if stale := [d for d in ck.glob("step_*") if _step_of(d) > self.step]:  # resume=False: start over
                warnings.warn(f"{self.out}: removing {len(stale)} checkpoint(s) past step {self.step}", stacklevel=3)
                for d in stale:
                    shutil.rmtree(d)
        except OSError as e:
            raise RuntimeError(f"output folder {self.out} is not writable: {e.strerror or _oneline(e)}") from None

    def _full_state(self) -> tuple[dict, dict | None, dict]:
        """(model, EMA, optimizer state keyed by flat parameter index) as full tensors. With FSDP a collective:
        every rank calls it, rank 0 gets the tensors."""
        if not self.fsdp:
            return (self.model.state_dict(), self._prefixed(self.ema.state_dict()) if self.ema is not None else None,
                    self.optimizer.state_dict()["state"])
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = get_model_state_dict(self.model, options=opts)
        ema = self._prefixed(get_model_state_dict(self.ema, options=opts)) if self.ema is not None else None
        index = {n: i for i, n in enumerate(n for g in self.param_names for n in g)}
        opt = get_optimizer_state_dict(self.model, self.optimizer, options=opts).get("state", {})  # rank 0 only
        return model, ema, {index[n]: st for n, st in opt.items()}

    def save(self):
        """Write checkpoints/step_XXXXXX atomically (temp folder + os.replace), point `latest` at it, prune.
        Rank 0 writes; with FSDP every rank must call it (the full tensors are gathered)."""
        model_sd, ema_sd, opt_state = self._full_state()
        if self.rank != 0:
            return
        ck, name = self.out / "checkpoints", f"step_{self.step:06d}"
        tmp, final = ck / f".tmp_{name}", ck / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_cpu(model_sd), tmp / "model.safetensors")
        if ema_sd is not None:
            save_file(_cpu(ema_sd), tmp / "ema.safetensors")
        # Adam's exp_avg, exp_avg_sq and step count are tensors -> "3.exp_avg"; anything else goes to the JSON
        tensors = {f"{i}.{k}": v for i, st in opt_state.items() for k, v in st.items() if torch.is_tensor(v)}
        other = {str(i): {k: v for k, v in st.items() if not torch.is_tensor(v)} for i, st in opt_state.items()}
        meta = {"param_names": self.param_names, "state": other,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]}
        save_file(_cpu(tensors), tmp / "optimizer.safetensors", metadata={"optimizer": json.dumps(meta)})
        state = {"step": self.step, "config": asdict(self.cfg), "world_size": self.world, "elapsed": self.elapsed,
                 "log_acc": self._acc,
                 "versions": {"python": platform.python_version(), "torch": torch.__version__}}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        for f in tmp.iterdir():  # on disk before the rename makes the folder visible (power loss, not just kill)
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        if final.exists():  # only when a step is saved twice (e.g. a rerun over an old folder)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(ck / "latest", name + "\n")
        for d in sorted(ck.glob("step_*"), key=_step_of)[:-self.cfg.keep]:
            shutil.rmtree(d, ignore_errors=True)

    # -------------------------------------------------------------------------------------- training
    def _averaged(self) -> nn.Module:
        """The module the EMA follows: the model, or its submodule `ema_of`."""
        return self.model.get_submodule(self.ema_prefix[:-1]) if self.ema_prefix else self.model

    def _prefixed(self, sd: dict) -> dict:
        return {self.ema_prefix + k: v for k, v in sd.items()}

    @torch.no_grad()
    def _update_ema(self):
        # one foreach call, not a kernel per tensor (a GPU step of a small model is launch-bound)
        # with FSDP both are sharded alike (FSDP2 splits each tensor on dim 0): each rank averages its own shards
        src = self._averaged()
        torch._foreach_lerp_([_local(p) for p in self.ema.parameters()],
                             [_local(p).float() for p in src.parameters()], 1.0 - self.cfg.ema_decay)
        for e, b in zip(self.ema.buffers(), src.buffers()):
            e.copy_(b)

    def _micro_batch(self, model: nn.Module, s: int, m: int) -> dict[str, float]:
        """Forward + backward of micro-batch m of step s on this rank; returns its loss and metrics."""
        cfg = self.cfg
        slot = m * self.world + self.rank  # 1 process x accum 2 == 2 processes x accum 1, sample for sample
        start = (s * self.world * cfg.grad_accum + slot) * cfg.batch_size
        seed = micro_seed(cfg.seed, s, slot)
        gen = torch.Generator().manual_seed(seed)  # CPU on every device: draw, then .to(device) (same noise on GPU)
        torch.manual_seed(seed)  # modules that use the global RNG (dropout) replay exactly too
        batch = _to(self.task.batch(list(range(start, start + cfg.batch_size))), self.device)
        sync = self.ddp is None or m == cfg.grad_accum - 1  # DDP all-reduces once, after the last micro-batch
        if self.fsdp:  # FSDP reduce-scatters once, likewise
            self.model.set_requires_gradient_sync(m == cfg.grad_accum - 1)
        with contextlib.nullcontext() if sync else self.ddp.no_sync():
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                loss, metrics = self.task.loss(model, batch, gen)
            loss = loss.float()
            if loss.dim() != 0:
                raise ValueError(f"Task.loss must return a scalar (mean over the micro-batch), not {tuple(loss.shape)}")
            (loss / cfg.grad_accum).backward()  # the step's gradient is the mean over micro-batches
        return {"loss": loss.item(), **{(f"task_{k}" if k in _RESERVED else k): float(v) for k, v in metrics.items()}}

    def run(self) -> dict:
        """Train from self.step to cfg.steps. Returns the last log record (loss, metrics: means since the
        previous record, over all ranks). on_step(trainer), if given, runs on every rank after each step."""
        cfg, model = self.cfg, self.ddp or self.model
        G = self.world * cfg.grad_accum * cfg.batch_size  # samples per optimizer step, all ranks
        bar = tqdm(total=cfg.steps, initial=self.step, disable=self.quiet or self.rank != 0, file=sys.stderr,
                   dynamic_ncols=True, desc=self.out.name)
        t_start = t_log = time.perf_counter()
        elapsed0, log_step0 = self.elapsed, self.step
        self.optimizer.zero_grad(set_to_none=True)
        while self.step < cfg.steps:
            lr = lr_at(cfg, self.step)
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            model.train()  # every step: on_step may have switched to eval for sampling
            if hasattr(self.task, "begin_step"):
                self.task.begin_step(self.step)
            rows = [self._micro_batch(model, self.step, m) for m in range(cfg.grad_accum)]
            keys = sorted(rows[0])
            stats = torch.tensor([[r[k] for k in keys] for r in rows], dtype=torch.float64).mean(0)
            if self.world > 1:  # log the global mean (gloo has no AVG: sum, then divide)
                stats = stats.to(self.device)
                dist.all_reduce(stats)
                stats = stats.cpu() / self.world
            norms = {g: nn.utils.clip_grad_norm_(ps, cfg.grad_clip or math.inf)  # measures it too
                     for g, ps in self.clip_groups}
            norms = {g: _local(n.full_tensor() if isinstance(n, DTensor) else n) for g, n in norms.items()}
            grad_norm = torch.stack(list(norms.values())).norm() if len(norms) > 1 else next(iter(norms.values()))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.model.zero_grad(set_to_none=True)  # also grads of params the optimizer leaves alone
            if self.ema is not None:
                self._update_ema()
            self.step += 1
            self.elapsed = elapsed0 + time.perf_counter() - t_start

            group_norms = [(f"grad_norm_{g.rstrip('.')}", n.item()) for g, n in norms.items()] if len(norms) > 1 else []
            for k, v in [*zip(keys, stats.tolist()), ("grad_norm", grad_norm.item()), *group_norms, ("n", 1)]:
                self._acc[k] = self._acc.get(k, 0.0) + v
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now, acc, self._acc = time.perf_counter(), self._acc, {}
                rate = (self.step - log_step0) * G / max(now - t_log, 1e-9)
                t_log, log_step0, n = now, self.step, acc.pop("n")
                self.last = {"step": self.step, "loss": acc.pop("loss") / n, "lr": lr,
                             "grad_norm": acc.pop("grad_norm") / n, "samples/s": rate, "elapsed": self.elapsed,
                             **{k: v / n for k, v in acc.items()}}
                bar.set_postfix(loss=f"{self.last['loss']:.4g}", samples_s=f"{rate:.1f}", refresh=False)
                if self.rank == 0:
                    with open(self.out / "log.jsonl", "a") as f:
                        f.write(json.dumps(self.last) + "\n")
            if (self.rank == 0 or self.fsdp) and (self.step % cfg.ckpt_every == 0 or self.step == cfg.steps):
                self.save()
            bar.update(1)
            if self.on_step is not None:
                self.on_step(self)
            if cfg.max_minutes is not None and self._out_of_time(t_start):
                if (self.rank == 0 or self.fsdp) and self.step % cfg.ckpt_every != 0 and self.step != cfg.steps:
                    self.save()
                if self.rank == 0:  # the log has no row for steps since the last one: say where it stopped
                    n = self._acc.get("n", 0)
                    since = f", mean loss {self._acc['loss'] / n:.4g} over its last {n:g} step{'s' * (n != 1)}" \
                        if n else ""
                    print(f"{self.out.name}: stopped at step {self.step} of {cfg.steps} after --max-minutes "
                          f"{cfg.max_minutes:g}{since}; the same command resumes", file=sys.stderr)
                break
        bar.close()
        if self.world > 1:  # the final checkpoint is on disk before any rank goes on to read it
            dist.barrier()
        return self.last


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _shard(model: nn.Module, broadcast: bool = True):
    """FSDP2: every child of a ModuleList named `blocks` (transformer blocks) is a unit, the model the root; a unit's
    `fsdp_forward_methods` gather it like forward() does. Rank 0's weights are broadcast first (unless every rank
    loaded the same file), so every rank shards the same tensors (as DDP's start does). A module still on the CPU
    moves to the device unit by unit as it is sharded: a whole copy never needs to fit there."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()] if broadcast else []:
            dist.broadcast(t.data, 0)
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] == "blocks":
            for blk in m:
                fully_shard(blk)
                for method in getattr(blk, "fsdp_forward_methods", ()):  # e.g. Block.text_kv
                    register_fsdp_forward_method(blk, method)
    fully_shard(model)
    for method in getattr(model, "fsdp_forward_methods", ()):  # a model used on its own: CausalWanModel.text_kv
        register_fsdp_forward_method(model, method)


# ------------------------------------------------------------------------------------------------ CLI

_ARGS = [  # flag, TrainConfig field, type, help
    ("--steps", "steps", int, "optimizer steps in total"),
    ("--batch-size", "batch_size", int, "samples per micro-batch per process"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step per process"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--warmup", "warmup_steps", int, "linear warm-up steps"),
    ("--lr-schedule", "lr_schedule", str, "constant | cosine (after warm-up)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (matrices only)"),
    ("--grad-clip", "grad_clip", float, "max gradient norm (<= 0 disables)"),
    ("--ema", "ema_decay", float, "keep an EMA of the weights with this decay, e.g. 0.999"),
    ("--ckpt-every", "ckpt_every", int, "checkpoint every N steps"),
    ("--log-every", "log_every", int, "log every N steps"),
    ("--seed", "seed", int, "seed of data order and noise"),
    ("--keep", "keep", int, "checkpoints kept"),
    ("--max-minutes", "max_minutes", float, "stop after this much wall time, with a checkpoint (resume goes on)"),
    ("--amp", "amp", str, "none | bf16: autocast the loss (on a GPU: bf16 tensor cores)"),
]
_ALIASES = {"warmup": "warmup_steps", "ema": "ema_decay"}


def add_train_args(parser: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    """Adds the training flags; keyword defaults override TrainConfig's (e.g. steps=5000, warmup=100,
    out="runs/vae", quiet=True). --steps and --out are required unless given a default."""
    base = {f.name: (None if f.default is MISSING else f.default) for f in fields(TrainConfig)}
    base.update(out=None, no_resume=False, quiet=False)
    d = {_ALIASES.get(k, k): v for k, v in defaults.items()}
    if unknown := set(d) - set(base):
        raise TypeError(f"add_train_args: unknown defaults {sorted(unknown)}")
    base.update(d)
    g = parser.add_argument_group("training")
    for flag, dest, typ, help in _ARGS:
        g.add_argument(flag, dest=dest, type=typ, default=base[dest], required=base[dest] is None and dest == "steps",
                       help=f"{help} (default: {base[dest]})")
    g.add_argument("--fsdp", action="store_true", default=False,
                   help="under torchrun: shard weights, gradients, optimizer state and EMA over the processes (FSDP2)")
    g.add_argument("--out", default=base["out"], required=base["out"] is None, help="run folder")
    g.add_argument("--no-resume", action="store_true", default=base["no_resume"], help="start over, ignoring checkpoints")
    g.add_argument("--quiet", action="store_true", default=base["quiet"], help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    kw = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if kw.get("grad_clip") is not None and kw["grad_clip"] <= 0:  # "<= 0 disables" (nan stays, and is refused)
        kw["grad_clip"] = None
    return TrainConfig(**kw)
