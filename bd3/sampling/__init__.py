"""Samplers: the block sampler (BD3-LM / MDLM) with a KV cache, and the AR sampler.

- :func:`bd3.sampling.generate.generate`: a run's samples (routes by algorithm, batches).
- :func:`bd3.sampling.block.sample_blocks`: blocks left to right, first-hitting / ddpm /
  confidence-threshold updates inside a block, per-row stops; takes a DiT or any denoiser.
- :func:`bd3.sampling.ar.sample_ar`: token by token with a KV cache.
- :mod:`bd3.sampling.engine`: the inference view of a DiT the samplers run on.
- :mod:`bd3.sampling.rules`: SUBS probabilities, nucleus, float64 draws.
- :mod:`bd3.sampling.text`: rendering and streaming text / JSONL.
"""
