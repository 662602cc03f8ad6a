"""Toy run for tests/test_trainer.py: a tiny MLP regressing a fixed random function with distill.trainer.

    python tests/trainer_toy.py --out /tmp/toy --steps 30 --ckpt-every 10
    torchrun --standalone --nproc_per_node 2 tests/trainer_toy.py --out /tmp/toy2 --steps 30

STREAMGEN_KILL_AT_STEP=k makes the process SIGKILL itself right after step k (the crash of the resume test).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.trainer import (Trainer, add_train_args, config_from_args, setup_distributed,  # noqa: E402
                             teardown_distributed)

DIM = 8


class ToyTask:
    """x ~ N(0, 1) seeded by the sample id, y = tanh(x @ W); the loss perturbs x with `noise` * randn(gen)."""

    def __init__(self, noise: float = 0.1):
        self.noise = noise
        self.w = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(1234))

    def batch(self, sample_ids):
        x = torch.stack([torch.randn(DIM, generator=torch.Generator().manual_seed(i)) for i in sample_ids])
        return {"x": x, "y": torch.tanh(x @ self.w)}

    def loss(self, model, batch, gen):
        x = batch["x"] + self.noise * torch.randn(batch["x"].shape, generator=gen).to(batch["x"].device)
        err = (model(x) - batch["y"]).pow(2)
        return err.mean(), {"max_err": err.max().item()}


def make_model(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(DIM, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, DIM))
    with torch.no_grad():  # explicit generator: no global RNG
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def main(argv=None, on_step=None) -> Trainer | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, steps=30, batch_size=4, lr=1e-2, ckpt_every=10, log_every=1)
    parser.add_argument("--noise", type=float, default=0.1, help="input noise drawn from the loss generator")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    rank, world, device = setup_distributed()
    kill_at = int(os.environ.get("STREAMGEN_KILL_AT_STEP", "-1"))

    def hook(trainer):
        if trainer.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if on_step is not None:
            on_step(trainer)

    trainer = Trainer(make_model(cfg.seed), ToyTask(args.noise), cfg, args.out, device=device,
                      resume=not args.no_resume, quiet=args.quiet, on_step=hook)
    trainer.run()
    if world > 1:  # nothing may hold the sharded model (its device mesh keeps the process group) past the teardown
        trainer = None
    teardown_distributed()
    return trainer


if __name__ == "__main__":
    main()
