"""distill/trainer.py: exact resume after SIGKILL, grad accumulation == torchrun DDP, EMA, checkpoint errors.

The toy run (tests/trainer_toy.py) is a tiny MLP on a synthetic regression task; the subprocess runs start in
parallel in one module fixture so the file stays well under a minute on 2 cores.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from distill.trainer import TrainConfig, Trainer, add_train_args, config_from_args, load_weights, lr_at

HERE = Path(__file__).resolve().parent
TOY = HERE / "trainer_toy.py"
_spec = importlib.util.spec_from_file_location("trainer_toy", TOY)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

COMMON = ["--steps", "30", "--batch-size", "4", "--ckpt-every", "10", "--log-every", "1", "--ema", "0.9", "--quiet"]


def _log(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def _popen(args, out, kill_at=None, torchrun=False):
    env = {k: v for k, v in os.environ.items() if k not in ("STREAMGEN_KILL_AT_STEP", "WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = "1"  # 2 cores shared by up to 4 processes
    if kill_at is not None:
        env["STREAMGEN_KILL_AT_STEP"] = str(kill_at)
    launcher = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"] if torchrun \
        else [sys.executable]
    return subprocess.Popen([*launcher, str(TOY), "--out", str(out), *COMMON, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc):
    out, _ = proc.communicate(timeout=300)  # generous: a loaded machine runs 4 processes on 2 cores
    return proc.returncode, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    full = _popen(["--grad-accum", "2"], d / "full")  # 1 process, 2 micro-batches per step
    killed = _popen(["--grad-accum", "2"], d / "killed", kill_at=17)  # last checkpoint before the kill: 10
    ddp = _popen(["--grad-accum", "1"], d / "ddp", torchrun=True)  # 2 processes, 1 micro-batch each
    # FSDP over 2 processes, stopped at step 20 and resumed (sharded optimizer state written and read back)
    fsdp = _popen(["--grad-accum", "1", "--fsdp", "--steps", "20"], d / "fsdp", torchrun=True)
    results = {name: _wait(p) for name, p in [("full", full), ("killed", killed), ("ddp", ddp), ("fsdp", fsdp)]}
    assert results["full"][0] == 0, results["full"][1]
    assert results["ddp"][0] == 0, results["ddp"][1]
    assert results["fsdp"][0] == 0, results["fsdp"][1]
    rc, out = _wait(_popen(["--grad-accum", "1", "--fsdp"], d / "fsdp", torchrun=True))
    assert rc == 0, out
    assert results["killed"][0] == -9, results["killed"][1]
    at_kill = {"log_steps": [r["step"] for r in _log(d / "killed")],
               "latest": (d / "killed/checkpoints/latest").read_text().strip()}
    rc, out = _wait(_popen(["--grad-accum", "2"], d / "killed"))  # resume
    assert rc == 0, out
    return d, at_kill


def test_sigkill_then_resume_replays_exactly(runs):
    d, at_kill = runs
    assert at_kill == {"log_steps": list(range(1, 18)), "latest": "step_000010"}  # steps 11..17 were lost
    full, resumed = _log(d / "full"), _log(d / "killed")
    assert [r["step"] for r in resumed] == list(range(1, 31))  # one run: lines past step 10 were dropped
    for key in ("loss", "grad_norm", "max_err", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in full], key  # bitwise
    for which in ("model", "ema"):
        a, b = load_weights(d / "full", which), load_weights(d / "killed", which)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (d / "killed/checkpoints").iterdir()) == ["latest", "step_000020", "step_000030"]


def _matches_full(d, name, rtol, weights=("model",)) -> dict:
    """A 2-process run equals the 1-process, 2-micro-batch one up to reduction order; returns its last state."""
    full, other = _log(d / "full"), _log(d / name)
    assert [r["step"] for r in other] == list(range(1, 31))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in other]), torch.tensor([r["loss"] for r in full]),
                               rtol=rtol, atol=1e-7)
    for which in weights:
        a, b = load_weights(d / "full", which), load_weights(d / name, which)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    state = json.loads((d / name / "checkpoints/step_000030/state.json").read_text())
    assert state["world_size"] == 2 and state["config"]["grad_accum"] == 1
    return state


def test_torchrun_two_processes_match_grad_accum(runs):
    _matches_full(runs[0], "ddp", rtol=1e-6)


def test_fsdp_matches_grad_accum_across_a_resume(runs):
    # full tensors on disk (model and EMA), the same files as without FSDP
    assert _matches_full(runs[0], "fsdp", rtol=1e-5, weights=("model", "ema"))["config"]["fsdp"]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_grad_accum_equals_one_big_batch(tmp_path, one_thread):
    # noise 0: the loss ignores gen, so the two runs differ only in how the same 8 samples are split
    args = ["--steps", "5", "--noise", "0", "--quiet", "--log-every", "1"]
    a = toy.main([*args, "--out", str(tmp_path / "a"), "--batch-size", "4", "--grad-accum", "2"])
    b = toy.main([*args, "--out", str(tmp_path / "b"), "--batch-size", "8", "--grad-accum", "1"])
    torch.testing.assert_close(torch.tensor([r["loss"] for r in _log(tmp_path / "a")]),
                               torch.tensor([r["loss"] for r in _log(tmp_path / "b")]), rtol=1e-6, atol=1e-7)
    for (k, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)


def test_ema_is_the_hand_computed_average(tmp_path, one_thread):
    init = toy.make_model(0).state_dict()
    seen = []
    trainer = toy.main(["--out", str(tmp_path), "--steps", "4", "--ema", "0.8", "--quiet"],
                       on_step=lambda t: seen.append({k: v.clone() for k, v in t.model.state_dict().items()}))
    assert len(seen) == 4
    for k, e in init.items():
        for w in seen:
            e = 0.8 * e + 0.2 * w[k]
        torch.testing.assert_close(trainer.ema.state_dict()[k], e, rtol=1e-6, atol=1e-7)
        assert torch.equal(load_weights(tmp_path)[k], trainer.ema.state_dict()[k])  # "ema" is the default
        assert torch.equal(load_weights(tmp_path, "model")[k], seen[-1][k])


def test_ema_of_a_submodule_keeps_the_model_key_names(tmp_path, one_thread):
    """ema_of="0": the EMA averages only the first layer (DMD's generator, not its critic), saved under the
    model's names; a resume reads it back, and an older whole-model EMA file reads the same way."""
    def trainer(steps, out=tmp_path / "run"):
        return Trainer(toy.make_model(0), toy.ToyTask(), TrainConfig(steps=steps, batch_size=4, ema_decay=0.8),
                       out, quiet=True, ema_of="0")

    init = toy.make_model(0)[0].state_dict()
    seen = []
    t = trainer(3)
    t.on_step = lambda t: seen.append({k: v.clone() for k, v in t.model[0].state_dict().items()})
    t.run()
    ema = load_weights(tmp_path / "run")
    assert sorted(ema) == ["0.bias", "0.weight"]  # nothing of layers 2 and 4
    for k, e in init.items():
        for w in seen:
            e = 0.8 * e + 0.2 * w[k]
        torch.testing.assert_close(ema["0." + k], e, rtol=1e-6, atol=1e-7)
    # resume: 3 + 2 steps equal 5 in one go, EMA included
    full = trainer(5, tmp_path / "full")
    full.run()
    resumed = trainer(5)
    resumed.run()
    for k, v in full.ema.state_dict().items():
        assert torch.equal(resumed.ema.state_dict()[k], v), k
    # a checkpoint whose EMA covers the whole model (written before ema_of existed) still resumes
    from safetensors.torch import save_file

    ck = tmp_path / "full/checkpoints/step_000005"
    save_file({k: v.contiguous() for k, v in load_weights(ck, "model").items()}, ck / "ema.safetensors")
    old = trainer(6, tmp_path / "full")
    assert torch.equal(old.ema.state_dict()["weight"], old.model[0].weight.detach())


def test_max_minutes_stops_with_a_checkpoint_and_resume_goes_on_exactly(tmp_path, one_thread, capsys):
    args = ["--steps", "7", "--ckpt-every", "5", "--log-every", "3", "--ema", "0.9", "--quiet"]
    toy.main([*args, "--out", str(tmp_path / "full")])
    # --max-minutes 0: every invocation stops after one step, saving a checkpoint off the --ckpt-every grid
    for k in range(1, 4):
        capsys.readouterr()
        t = toy.main([*args, "--out", str(tmp_path / "cut"), "--max-minutes", "0"])
        assert t.step == k and (tmp_path / "cut/checkpoints/latest").read_text().strip() == f"step_{k:06d}"
        # the log has no row yet for steps 1, 2 (--log-every 3): the stop says where it is, even with --quiet
        err = capsys.readouterr().err
        assert f"stopped at step {k} of 7" in err and "the same command resumes" in err
        assert ("mean loss" in err) == (k < 3) and (f"over its last {k} step" in err) == (k < 3), err
    toy.main([*args, "--out", str(tmp_path / "cut")])
    full, cut = _log(tmp_path / "full"), _log(tmp_path / "cut")
    assert [r["step"] for r in cut] == [3, 6, 7]  # the log's partial sums travelled in the checkpoints
    for key in ("loss", "grad_norm", "max_err"):
        assert [r[key] for r in cut] == [r[key] for r in full], key
    for which in ("model", "ema"):
        a, b = load_weights(tmp_path / "full", which), load_weights(tmp_path / "cut", which)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_amp_bf16_autocasts_the_loss(tmp_path, one_thread):
    toy.main(["--steps", "3", "--quiet", "--noise", "0", "--out", str(tmp_path / "a")])
    b = toy.main(["--steps", "3", "--quiet", "--noise", "0", "--out", str(tmp_path / "b"), "--amp", "bf16"])
    # the matmuls ran in bf16: the two runs' losses differ, a little
    la, lb = (torch.tensor([r["loss"] for r in _log(tmp_path / d)]) for d in ("a", "b"))
    assert not torch.equal(la, lb)
    torch.testing.assert_close(lb, la, rtol=0.05, atol=1e-3)
    assert all(p.dtype == torch.float32 for p in b.model.parameters())  # weights stay fp32
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(steps=1, amp="fp16")


def test_corrupt_checkpoint_names_the_file(tmp_path, one_thread):
    toy.main(["--out", str(tmp_path), "--steps", "3", "--quiet"])
    bad = tmp_path / "checkpoints/step_000003/model.safetensors"
    bad.write_bytes(bad.read_bytes()[:500])  # cut short, as by a full disk
    for load in (lambda: toy.main(["--out", str(tmp_path), "--steps", "6", "--quiet"]),
                 lambda: load_weights(tmp_path, "model")):
        with pytest.raises(RuntimeError, match="step_000003/model.safetensors") as info:
            load()
        assert "\n" not in str(info.value)
    (tmp_path / "checkpoints/step_000003/state.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="state.json"):
        toy.main(["--out", str(tmp_path), "--steps", "6", "--quiet"])


def test_unwritable_out_dir(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RuntimeError, match="not writable"):
        Trainer(nn.Linear(2, 2), toy.ToyTask(), TrainConfig(steps=1), tmp_path / "file" / "run", quiet=True)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight  # shared storage: safetensors refuses it unless the trainer copies

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_tied_weights_resume_and_changed_config_warns(tmp_path, one_thread):
    cfg = TrainConfig(steps=2, batch_size=4, ckpt_every=1, ema_decay=0.5)
    first = Trainer(Tied(), toy.ToyTask(), cfg, tmp_path, quiet=True)
    first.run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same exactness-relevant config: no warning
        again = Trainer(Tied(), toy.ToyTask(), TrainConfig(**{**cfg.__dict__, "steps": 3}), tmp_path, quiet=True)
    assert again.step == 2 and again.model.a.weight is again.model.b.weight
    assert torch.equal(again.model.a.weight, first.model.a.weight)
    assert torch.equal(again.optimizer.state_dict()["state"][0]["step"], torch.tensor(2.0))  # Adam step count
    again.run()
    with pytest.warns(UserWarning, match="batch_size 4 -> 2"):
        Trainer(Tied(), toy.ToyTask(), TrainConfig(**{**cfg.__dict__, "batch_size": 2}), tmp_path, quiet=True)


def test_lr_schedule_and_cli():
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2, lr_schedule="cosine")
    assert [round(lr_at(cfg, s), 6) for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    assert lr_at(TrainConfig(steps=10, lr=0.1), 9) == 0.1
    parser = add_train_args(argparse.ArgumentParser(), steps=100, out="runs/x", warmup=5)
    args = parser.parse_args(["--batch-size", "2", "--ema", "0.99", "--grad-clip", "0", "--no-resume"])
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.batch_size, cfg.warmup_steps, cfg.ema_decay, cfg.grad_clip) == (100, 2, 5, 0.99, None)
    assert args.out == "runs/x" and args.no_resume and not args.quiet
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(steps=1, lr_schedule="linear")
    # numbers no run can mean, nan included (it passes every `x < 0` check), are refused by name
    for flags, field in ((["--lr", "-1"], "lr"), (["--lr", "nan"], "lr"), (["--weight-decay", "inf"], "weight_decay"),
                         (["--grad-clip", "nan"], "grad_clip"), (["--ema", "1"], "ema_decay"),
                         (["--ema", "-0.5"], "ema_decay"), (["--max-minutes", "nan"], "max_minutes")):
        with pytest.raises(ValueError, match=field):
            config_from_args(parser.parse_args(flags))
    assert config_from_args(parser.parse_args(["--ema", "0", "--lr", "0"])).ema_decay == 0.0  # edge values pass
