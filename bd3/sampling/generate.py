"""One entry point for a run's samples: routes by algorithm and batches the samples.

- ``bd3lm``: the block sampler at the run's (or a given) block size, KV-cached.
- ``mdlm``: block size = length with full attention; beyond the length a window of
  ``length`` tokens slides by half of it (MDLM's semi-autoregressive stride).
- ``ar``: token by token with a KV cache.
- ``sedd``: the analytic (Tweedie tau-leaping) sampler over the whole length, ``decoding.steps``
  steps, the same sliding window beyond the length as MDLM (:mod:`bd3.sampling.sedd`).

Sample ``i`` draws its random numbers from ``(seed, i)`` whatever the batch size, so the
same seed gives the same samples with any ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bd3.runtime import MODEL_PRECISIONS, autocast
from bd3.sampling.ar import sample_ar
from bd3.sampling.block import BlockEvent, Decoding, Sample, sample_blocks
from bd3.sampling.denoiser import backend_for
from bd3.sampling.sedd import sample_sedd
from bd3.sampling.threads import ThreadTuner

TOKEN_BYTES = 96  # per token of each sample: its id in the sampler's buffer (8) and as a Python int (40), its text and JSON
BLOCK_BYTES = 128  # per block of the schedule: its (start, end) pair


def sample_memory(num_samples: int, max_tokens: int, block_size: int) -> int:
    """About the bytes :func:`generate` holds for ``num_samples`` samples of ``max_tokens``
    tokens (every finished sample is kept until the last one is done)."""
    return num_samples * max_tokens * TOKEN_BYTES + (max_tokens // block_size + 1) * BLOCK_BYTES


def max_sample_tokens(memory: int, num_samples: int, block_size: int) -> int:
    """The largest ``max_tokens`` whose :func:`sample_memory` fits in ``memory`` bytes."""
    return int((memory - BLOCK_BYTES) / (num_samples * TOKEN_BYTES + BLOCK_BYTES / block_size))


def generate(
    model,
    config,
    *,
    num_samples: int = 1,
    batch_size: int | None = None,
    max_tokens: int,
    prompt: Sequence[int] | None = None,
    block_size: int | None = None,
    decoding: Decoding | None = None,
    kv_cache: bool = True,
    seed: int = 0,
    engine: bool = True,
    precision: str = "fp32",
    threads: int | None = None,
    on_block: Callable[[BlockEvent], None] | None = None,
) -> list[Sample]:
    """``num_samples`` samples from ``model`` (a DiT) of a run with ``config`` (RunConfig).
    ``precision``: fp32; bf16 (the engine's linear layers in bf16; SEDD's DiT under bf16
    autocast); fp16 (the engine's linear weights in float16, x86 CPUs; not for SEDD)."""
    decoding = decoding or Decoding()
    algo, L = config.diffusion.algo, config.model.length
    data = config.data
    # built once, shared by the batches (SEDD is time-conditioned: the DiT itself, no engine)
    if algo == "sedd" and precision not in MODEL_PRECISIONS:
        raise ValueError(f"SEDD samples through the DiT itself, in fp32 or bf16, not {precision!r}")
    backend = model if algo == "sedd" else backend_for(model, engine, precision)
    device = model.vocab_embed.embedding.device if algo == "sedd" else backend.device
    threads = ThreadTuner(threads, device)  # so is what it learnt about threads
    batch_size = min(batch_size or num_samples, num_samples)
    prompt = list(prompt) if prompt is not None else [data.start_id]
    common = dict(max_tokens=max_tokens, length=L, mask_id=data.mask_id, bos_id=data.bos_id, eos_id=data.eos_id,
                  prompt=prompt, seed=seed, decoding=decoding, on_block=on_block, threads=threads)
    out: list[Sample] = []
    for first in range(0, num_samples, batch_size):
        samples = list(range(first, min(first + batch_size, num_samples)))
        if algo == "ar":
            out += sample_ar(backend, samples=samples, **common)
        elif algo == "sedd":
            with autocast(device, precision):
                out += sample_sedd(backend, samples=samples, schedule=config.diffusion.schedule, **common)
        elif algo == "mdlm":
            out += sample_blocks(backend, samples=samples, block_size=max(L // 2, 1), mdlm=True, **common)
        else:
            out += sample_blocks(backend, samples=samples, block_size=block_size or config.diffusion.block_size,
                                 kv_cache=kv_cache, **common)
    return out
