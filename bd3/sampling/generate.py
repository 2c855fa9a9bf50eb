"""One entry point for a run's samples: routes by algorithm and batches the samples.

- ``bd3lm``: the block sampler at the run's (or a given) block size, KV-cached.
- ``mdlm``: block size = length with full attention; beyond the length a window of
  ``length`` tokens slides by half of it (MDLM's semi-autoregressive stride).
- ``ar``: token by token with a KV cache.
- ``sedd``: the analytic (Tweedie tau-leaping) sampler over the whole length, ``decoding.steps``
  steps, the same sliding window beyond the length as MDLM (:mod:`bd3.sampling.sedd`).

Sample ``i`` draws its random numbers from ``(seed, i)`` whatever the batch size, so the
same seed gives the same samples with any ``batch_size``. Samples share one ``prompt``, or
each has its own (``prompts``, with ``max_tokens`` one per sample): a sample's tokens then
do not depend on the prompts of the others in its batch either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

from bd3.runtime import autocast
from bd3.sampling.ar import sample_ar
from bd3.sampling.block import sample_blocks
from bd3.sampling.denoiser import ModelDenoiser
from bd3.sampling.engine import inference_forward
from bd3.sampling.rng import RowRNG
from bd3.sampling.sedd import sample_sedd
from bd3.sampling.types import BlockEvent, Decoding, Sample

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
    max_tokens: int | Sequence[int],
    prompt: Sequence[int] | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
    streams: Sequence[int] | None = None,
    block_size: int | None = None,
    decoding: Decoding | None = None,
    kv_cache: bool = True,
    seed: int = 0,
    engine: bool | None = None,
    precision: str = "fp32",
    threads: int | None = None,
    on_block: Callable[[BlockEvent], None] | None = None,
) -> list[Sample]:
    """``num_samples`` samples from ``model`` (a DiT) of a run with ``config`` (RunConfig).

    ``prompt``: every sample's first tokens (BOS included; default BOS alone); or
    ``prompts``, one per sample (``num_samples`` is then their number), with ``max_tokens``
    an int or one per sample. ``streams``: sample i draws from ``(seed, streams[i])``
    instead of ``(seed, i)``. ``engine``: run on the CPU engine (:mod:`bd3.sampling.engine`),
    or on the DiT itself; None (auto): the engine on a CPU, the DiT elsewhere. ``threads``:
    the engine's CPU threads (None: chosen by timing). ``precision``: fp32; bf16 (the
    engine's linear layers in bf16, or the DiT under bf16 autocast); fp16 (the engine's
    linear weights in float16, x86 CPUs)."""
    decoding = decoding or Decoding()
    if prompts is not None:
        if prompt is not None:
            raise ValueError("give prompt (every sample's) or prompts (one per sample), not both")
        num_samples = len(prompts)
    for name, per_sample in (("max_tokens", max_tokens), ("streams", streams)):
        if isinstance(per_sample, Sequence) and len(per_sample) != num_samples:
            raise ValueError(f"{name} has {len(per_sample)} entries for {num_samples} samples")
    algo, L = config.diffusion.algo, config.model.length
    data = config.data
    # built once, shared by the batches: the forward (the DiT, or its CPU engine and what
    # the engine's thread tuner learnt)
    net = inference_forward(model, engine, precision, threads=threads, time_conditioned=algo == "sedd")
    device = net.device
    batch_size = max(min(batch_size or num_samples, num_samples), 1)
    if prompts is None:
        prompt = list(prompt) if prompt is not None else [data.start_id]
    common = dict(length=L, mask_id=data.mask_id, bos_id=data.bos_id, eos_id=data.eos_id, prompt=prompt, seed=seed,
                  decoding=decoding, on_block=on_block, device=device)
    bs = max(L // 2, 1) if algo == "mdlm" else block_size or config.diffusion.block_size
    out: list[Sample] = []
    # the model itself runs bf16 under autocast; the engine has its precision built in
    with autocast(device, precision) if net is model else contextlib.nullcontext():
        for first in range(0, num_samples, batch_size):
            samples = list(range(first, min(first + batch_size, num_samples)))
            common.update(samples=samples, prompts=None if prompts is None else [prompts[i] for i in samples],
                          max_tokens=[max_tokens[i] for i in samples] if isinstance(max_tokens, Sequence) else max_tokens,
                          rng=None if streams is None else RowRNG.for_samples(seed, [streams[i] for i in samples]))
            if algo == "ar":
                out += sample_ar(ModelDenoiser(net, attention="causal", context=L - 1), **common)
            elif algo == "sedd":
                den = ModelDenoiser(net, attention="full", kv_cache=False)
                out += sample_sedd(den, schedule=config.diffusion.schedule, **common)
            elif algo == "mdlm":
                den = ModelDenoiser(net, attention="full", kv_cache=False, block_size=bs, context=L - bs)
                out += sample_blocks(den, block_size=bs, mdlm=True, **common)
            else:
                den = ModelDenoiser(net, block_size=bs, context=L - bs, kv_cache=kv_cache)
                out += sample_blocks(den, block_size=bs, **common)
    return out
