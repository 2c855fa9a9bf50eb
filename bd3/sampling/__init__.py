"""Samplers: block diffusion (BD3-LM, MDLM), token by token (AR) and SEDD's analytic sampler.

``bd3 sample`` from the command to the token draw, six functions:

1. :func:`bd3.cli.sample_cmd.sample`: options -> a :class:`~bd3.sampling.types.Decoding`,
   the run's model, then
2. :func:`bd3.sampling.generate.generate`: picks the forward the samplers call
   (:func:`bd3.sampling.engine.inference_forward`: the CPU engine, or the DiT itself),
   wraps it in a :class:`~bd3.sampling.denoiser.ModelDenoiser` per batch and routes by
   algorithm to
3. :func:`bd3.sampling.block.sample_blocks` (or ``sample_ar``, ``sample_sedd``): the spans
   (blocks, tokens, windows) and the batch's :class:`~bd3.sampling.rows.Rows`, run by
4. :func:`bd3.sampling.rows.run_rows`: the per-row loop every sampler shares (stops, EOS,
   entropy, finished rows leaving the batch and the KV cache), which calls the sampler's
   update rule for each span,
5. ``bd3.sampling.block._denoise`` (first-hitting, ddpm or threshold): asks the denoiser
   for logits at the positions it unmasks (the model call: ``ModelDenoiser.__call__`` ->
   ``Engine.forward`` or ``DiT.forward``), then
6. :func:`bd3.sampling.rules.draw`: one token per position from the nucleus distribution,
   by a float64 inverse CDF.

The modules:

- :mod:`~bd3.sampling.types`: ``Decoding``, ``Sample``, ``BlockEvent``, ``Stop``, the entropy rule.
- :mod:`~bd3.sampling.rows`: the batch (prompts, lengths, stops) and the shared loop.
- :mod:`~bd3.sampling.denoiser`: the one protocol the samplers call, and its model implementation.
- :mod:`~bd3.sampling.block`, :mod:`~bd3.sampling.ar`, :mod:`~bd3.sampling.sedd`: update rules.
- :mod:`~bd3.sampling.engine` (+ :mod:`~bd3.sampling.backbone`, :mod:`~bd3.sampling.threads`):
  the optional CPU accelerator, with the DiT's forward interface, tested equal to it.
- :mod:`~bd3.sampling.rules`: SUBS probabilities, nucleus, float64 draws.
- :mod:`~bd3.sampling.text`: rendering and streaming text / JSONL.
"""
