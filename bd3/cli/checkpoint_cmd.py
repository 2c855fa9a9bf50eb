"""`bd3 import` and `bd3 export`: released BD3-LM checkpoints <-> bd3 run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bd3.cli import options as o


def import_command(
    src: Annotated[str, typer.Argument(help="A folder with config.json + model.safetensors, or a hub id.")],
    out: Annotated[Path, typer.Argument(help="Run directory to create.")],
    tokenizer: Annotated[
        Optional[str],
        typer.Option(help="Tokenizer. Default: the folder's tokenizer.json (as `bd3 export` writes), else gpt2 for a 50258-token vocabulary.",
                     show_default=False),
    ] = None,
    data: Annotated[Optional[str], typer.Option(help="Data set the run evaluates on (default web).", show_default=False)] = None,
    force: o.Force = False,
) -> None:
    """Import a released BD3-LM checkpoint, or a folder written by `bd3 export`, as a bd3 run
    (EMA weights = the imported ones).

    Every tensor is checked by name and shape; the clip interval comes from the
    checkpoint's sampling_eps_min/max buffers.

    Examples:

    \b
      bd3 import kuleshov-group/bd3lm-owt-block_size4 runs/owt-bs4
      bd3 import ./bd3lm-owt-block_size16 runs/owt-bs16 --data owt
      bd3 import exported/web-bs4 runs/web-bs4-again     # a `bd3 export` folder, bit for bit
    """
    from bd3.cli.common import err
    from bd3.runs.hf import import_checkpoint

    run = import_checkpoint(src, out, tokenizer=tokenizer, data=data, force=force)
    c = run.config
    err.print(
        f"Imported {src} -> {run.path}: {c.model.n_layers} layers, width {c.model.hidden_dim}, block size "
        f"{c.diffusion.block_size}, clip {list(c.diffusion.clip)}"
    )


ExportPrecision = o.precision("export", "The exported weights' dtype: fp32, or bf16 (bfloat16 weights, half the size).")


def export_command(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the checkpoint into (an existing non-empty one needs --force).")],
    precision: ExportPrecision = "fp32",
    force: Annotated[bool, typer.Option("--force", help="Write into an existing non-empty folder (the files bd3 writes are replaced).")] = False,
) -> None:
    """Export a run's EMA weights as a checkpoint folder that HuggingFace `transformers`
    loads (AutoModelForMaskedLM with trust_remote_code=True, AutoTokenizer) and `bd3 import`
    reads back: the released BD3LM layout's config.json and model.safetensors, the modeling
    code (modeling_bd3lm.py, which imports the bd3 package), configuration_bd3lm.py and the
    run's tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json).

    Examples:

    \b
      bd3 export runs/owt-bs4 exported/bd3lm-owt-bs4
      bd3 export runs/owt-bs4 exported/bd3lm-owt-bs4-bf16 --precision bf16
      hf upload my-name/bd3lm-owt-bs4 exported/bd3lm-owt-bs4    # share it on the hub
    """
    from bd3.cli.common import err
    from bd3.runs.hf import export_checkpoint
    from bd3.runs.load import open_run

    path = export_checkpoint(open_run(run), out, precision=precision, force=force)
    err.print(f"Wrote {path}: config.json, model.safetensors ({precision}), modeling and tokenizer files")
