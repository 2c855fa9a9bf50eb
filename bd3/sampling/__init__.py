"""Samplers: the block sampler (BD3-LM / MDLM) with a KV cache, and the AR sampler."""
