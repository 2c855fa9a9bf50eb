"""`bd3 import` and `bd3 export`: released BD3-LM checkpoints <-> bd3 run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bd3.cli import options as o


def import_command(
    src: Annotated[str, typer.Argument(help="A folder with config.json + model.safetensors, or a hub id.")],
    out: Annotated[Path, typer.Argument(help="Run directory to create.")],
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer (default gpt2 for a 50258-token vocabulary).", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option(help="Data set the run evaluates on (default web).", show_default=False)] = None,
    force: o.Force = False,
) -> None:
    """Import a released BD3-LM checkpoint as a bd3 run (EMA weights = the imported ones).

    Every tensor is checked by name and shape; the clip interval comes from the
    checkpoint's sampling_eps_min/max buffers.

    Examples:

    \b
      bd3 import kuleshov-group/bd3lm-owt-block_size4 runs/owt-bs4
      bd3 import ./bd3lm-owt-block_size16 runs/owt-bs16 --data owt
    """
    from bd3.cli.common import err
    from bd3.runs.hf import import_checkpoint

    run = import_checkpoint(src, out, tokenizer=tokenizer, data=data, force=force)
    c = run.config
    err.print(
        f"Imported {src} -> {run.path}: {c.model.n_layers} layers, width {c.model.hidden_dim}, block size "
        f"{c.diffusion.block_size}, clip {list(c.diffusion.clip)}"
    )


def export_command(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    out: Annotated[Path, typer.Argument(help="Folder to write config.json and model.safetensors into.")],
    force: o.Force = False,
) -> None:
    """Export a run's EMA weights in the released BD3LM checkpoint layout.

    Examples:

    \b
      bd3 export runs/owt-bs4 exported/bd3lm-owt-bs4
    """
    from bd3.cli.common import err, open_run
    from bd3.runs.hf import export_checkpoint

    path = export_checkpoint(open_run(run), out, force=force)
    err.print(f"Wrote {path / 'config.json'} and {path / 'model.safetensors'}")
