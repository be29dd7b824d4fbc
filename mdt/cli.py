"""The `mdt` command line: parses and validates arguments, then calls the library.

Every command lives here as a thin wrapper; the work is done in the `mdt.*` modules so that a
library user can do the same from Python. A `UserError` anywhere below becomes one line on stderr
and exit status 2.
"""

from __future__ import annotations

import sys

import typer

from mdt.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


@app.callback()
def root() -> None:
    """mdt: train and sample masked latent diffusion transformers (MDT, MDTv2, MaskDiT, DiT)."""


@app.command("models")
def models_command() -> None:
    """List the model names `--model` accepts, with their parameter counts."""
    from mdt.models import create_model, list_models

    for name in list_models():
        model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        typer.echo(f"{name:16s} {params / 1e6:9.2f}M")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
