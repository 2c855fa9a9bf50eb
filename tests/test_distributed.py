"""Training on several processes (gloo on CPU): the same losses as one process with the same
global batch, checkpoints in the single-process format that resume on another number of
processes, DDP and FSDP2."""

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bd3.cli.main import main
from bd3.errors import Bd3Error
from bd3.runs import Run
from bd3.train.distributed import local_rows, micro_batches, resolve_global_batch

# nano has no dropout, so the losses cannot depend on how the batch is split; a large constant
# learning rate makes every step move the weights (AdamW is blind to the gradient's scale, the
# logged gradient norm is not).
TRAIN = [
    "--data", "web", "--length", "16", "--block-size", "4", "--log-every", "1", "--device", "cpu",
    "--precision", "fp32", "--eval-batches", "1", "--seed", "3", "--lr", "1e-2", "--warmup-steps", "0", "--attn", "sdpa",
]


def metrics(run: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in Run.open(run).metrics() if "loss" in r and r.get("event") is None}


def assert_same_steps(a: dict, b: dict, steps) -> None:
    """(loss, gradient norm) equal up to float32 rounding: sums taken in another order (other
    processes, micro-batches, thread counts) differ by ~1e-7, and two AdamW steps at lr 1e-2
    amplify that to ~1e-5 in the step-3 gradient norm (measured up to 1.2e-5)."""
    for step in steps:
        assert a[step][0] == pytest.approx(b[step][0], rel=1e-5), step
        assert a[step][1] == pytest.approx(b[step][1], rel=1e-4), step


def checkpoint(run: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    return {f"{f}:{k}": v for f in ("model", "ema", "train_state") for k, v in load_file(ckpt / f"{f}.safetensors").items()}


def assert_same_checkpoint(a: dict, b: dict) -> None:
    """Same keys, same values. AdamW's normalised update turns rounding differences in
    near-zero gradients into weight differences of a small fraction of the learning rate
    (1e-2 a step here; a wrong gradient moves most weights by about that much)."""
    extra = {k for k in b if ".rank" in k}  # the other processes' RNG states
    assert set(a) == set(b) - extra
    for k, v in a.items():
        if k.startswith("train_state:rng."):
            continue  # dropout RNG: per process
        assert torch.allclose(v.float(), b[k].float(), rtol=1e-3, atol=5e-4), k


def launch(bd3: list[str], args: list[str], cwd: Path, nproc: int = 2, timeout: float = 120.0) -> None:
    """What `torchrun --nproc-per-node N -m bd3 ...` does: N processes of the ``bd3`` command
    line (the fork server's client) with its environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(nproc):
        env = {
            **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
        }
        procs.append(subprocess.Popen([*bd3, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    end = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > end:
                break  # one failed: the others would wait for it
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # and its command with it
    errors = [f"rank {r}: exit {p.returncode}\n{p.communicate()[1]}" for r, p in enumerate(procs) if p.wait() != 0]
    assert not errors, "\n".join(errors)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_two_processes_give_the_losses_and_checkpoints_of_one(workdir, bd3_client):
    # one process, one batch of 4 (the plain loop); checkpoints at steps 2 and 3
    assert main(["pretrain", *TRAIN, "--batch-size", "4", "--steps", "3", "--save-every", "2", "--out", "one"]) == 0
    one = metrics(workdir / "one")
    # one process, two micro-batches of 2
    assert main(["pretrain", *TRAIN, "--batch-size", "2", "--global-batch-size", "4", "--steps", "3", "--out", "accum"]) == 0
    assert_same_steps(metrics(workdir / "accum"), one, [1, 2, 3])

    # DDP: two processes of 2 rows; rank 0 alone writes the run (and logs to TensorBoard, where installed)
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    logger = ["--logger", "tensorboard"] if tensorboard else []
    launch(bd3_client, ["pretrain", *TRAIN, "--batch-size", "2", "--steps", "2", "--out", "ddp", *logger], workdir)
    assert_same_steps(metrics(workdir / "ddp"), one, [1, 2])
    if tensorboard:
        assert len(list((workdir / "ddp" / "tb").glob("events.out.tfevents.*"))) == 1  # one writer: rank 0
    assert_same_checkpoint(checkpoint(workdir / "one", 2), checkpoint(workdir / "ddp", 2))
    assert "rng.torch.rank1" in load_file(workdir / "ddp" / "checkpoints" / "step-00000002" / "train_state.safetensors")
    # ... resumed in one process (two micro-batches of 2) it continues as the uninterrupted run
    assert main(["pretrain", "--resume", "--out", "ddp", "--steps", "3"]) == 0
    assert_same_steps(metrics(workdir / "ddp"), one, [1, 2, 3])

    # FSDP2: the one-process run's step-2 checkpoint resumed on two processes, sharded, and
    # gathered back into a step-3 checkpoint that matches the one-process run's
    shutil.copytree(workdir / "one", workdir / "fsdp")
    shutil.rmtree(workdir / "fsdp" / "checkpoints" / "step-00000003")
    launch(bd3_client, ["pretrain", "--resume", "--out", "fsdp", "--steps", "3", "--fsdp"], workdir)
    assert_same_steps(metrics(workdir / "fsdp"), one, [1, 2, 3])
    assert_same_checkpoint(checkpoint(workdir / "one", 3), checkpoint(workdir / "fsdp", 3))


def test_the_global_batch_splits_into_micro_batches_per_process():
    assert micro_batches(16, 4, 2) == (4, 2)  # 8 rows per process: 2 micro-batches of 4
    assert micro_batches(16, 16, 2) == (8, 1)
    assert micro_batches(12, 5, 2) == (3, 2)  # resumed elsewhere: the largest divisor of 6 up to 5
    with pytest.raises(Bd3Error, match="does not split evenly over 3 processes"):
        micro_batches(16, 4, 3)
    rows = [local_rows(16, 2, r, 4) for r in range(2)]
    assert rows == [[slice(0, 4), slice(4, 8)], [slice(8, 12), slice(12, 16)]]
    assert resolve_global_batch(0, 8, 4, resume=False) == 32
    assert resolve_global_batch(0, 8, 4, resume=True) == 8  # runs from before the option: one process
    assert resolve_global_batch(24, 8, 4, resume=True) == 24


def test_a_global_batch_that_is_not_a_multiple_is_a_clear_error(workdir, capsys):
    assert main(["pretrain", *TRAIN, "--batch-size", "3", "--global-batch-size", "4", "--steps", "1", "--out", "bad"]) == 1
    assert "--global-batch-size 4 is not a multiple of --batch-size 3" in capsys.readouterr().err


def test_fsdp_without_torchrun_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["pretrain", "--fsdp", "--steps", "1", "--length", "16", "--block-size", "4", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "--fsdp" in err and "torchrun" in err and "Traceback" not in err and not (tmp_path / "runs").exists()
