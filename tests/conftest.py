"""Shared fixtures: a tiny model config, a random-weight model, the reference fixture."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bd3.config import ModelConfig
from bd3.model import DiT

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_FIXTURE = ROOT / "tests" / "fixtures" / "bd3lms-reference"


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    """2 layers, width 32, length 16 (block size 4 in the tests)."""
    return ModelConfig(hidden_dim=32, n_heads=2, n_layers=2, cond_dim=16, length=16, dropout=0.0)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (adaLN and output layer too, which start at zero) random values,
    so a mistake anywhere shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a checksum of its bytes: equal trees hold
    equal files (what a refused command must leave)."""
    return {str(p.relative_to(root)): _sha256(p) if p.is_file() else "dir" for p in sorted(Path(root).rglob("*"))}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python 3.11: hashes from a buffer, without a copy of the file in memory
            return hashlib.file_digest(f, "sha256").hexdigest()
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def tiny_model(tiny_cfg) -> DiT:
    return randomize(DiT(tiny_cfg, vocab_size=40))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Token shards cached per test session, never in the user's ~/.cache."""
    monkeypatch.setenv("BD3_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "bd3-cache"))


@pytest.fixture
def reference_fixture() -> Path:
    """The reference implementation's parity fixture: the copy in tests/fixtures, or
    $BD3_REFERENCE_FIXTURE (another fixture of the same format, which must exist)."""
    path = Path(os.environ.get("BD3_REFERENCE_FIXTURE", REFERENCE_FIXTURE))
    if not (path / "expected.safetensors").exists():
        pytest.fail(f"reference fixture not found at {path}: BD3_REFERENCE_FIXTURE names a folder without expected.safetensors")
    return path


# -- the samplers over a DiT, with the denoiser generate() builds ---------------------------


def block_samples(model, *, block_size: int, length: int, kv_cache: bool = True, mdlm: bool = False, engine: bool | None = None, **kw):
    """``sample_blocks`` over ``model`` (through the CPU engine unless ``engine=False``)."""
    from bd3.sampling.block import sample_blocks
    from bd3.sampling.denoiser import ModelDenoiser
    from bd3.sampling.engine import inference_forward

    net = inference_forward(model, engine)
    attention = "full" if mdlm else "block"
    den = ModelDenoiser(net, attention=attention, block_size=block_size, context=length - block_size, kv_cache=kv_cache and not mdlm)
    return sample_blocks(den, block_size=block_size, length=length, mdlm=mdlm, **kw)


def ar_samples(model, *, length: int, engine: bool | None = None, **kw):
    from bd3.sampling.ar import sample_ar
    from bd3.sampling.denoiser import ModelDenoiser
    from bd3.sampling.engine import inference_forward

    return sample_ar(ModelDenoiser(inference_forward(model, engine), attention="causal", context=length - 1), length=length, **kw)


def sedd_samples(model, **kw):
    from bd3.sampling.denoiser import ModelDenoiser
    from bd3.sampling.sedd import sample_sedd

    return sample_sedd(ModelDenoiser(model, attention="full", kv_cache=False), **kw)


@pytest.fixture(scope="session")
def bd3_client(tmp_path_factory) -> list[str]:
    """The command line of a `bd3` that starts in milliseconds: a client of tests/forkserver.py,
    whose server imported torch and bd3 once (followed by ``-c CODE``: ``python -c CODE``). It
    runs under the environment and in the folder it is called with, and stands for the
    command (its exit code, SIGTERM and SIGINT)."""
    sock = tmp_path_factory.mktemp("fork") / "bd3.sock"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkserver.py"), "serve", str(sock)], env=env,
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    yield [sys.executable, str(ROOT / "tests" / "forkserver.py"), str(sock)]
    server.kill()
    server.wait()
