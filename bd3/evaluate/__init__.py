"""Evaluation: NELBO perplexity (an upper bound for the diffusion models) and NELBO variance."""
