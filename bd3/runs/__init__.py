"""Self-describing run directories: config, tokenizer, metrics, atomic safetensors checkpoints."""

from bd3.runs.rundir import Run, load_strict, load_tensors, new_run_name, resolve_run

__all__ = ["Run", "load_tensors", "load_strict", "new_run_name", "resolve_run"]
