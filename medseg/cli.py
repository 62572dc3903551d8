"""The `medseg` command line. Thin: parse, call one library function, print.

Heavy imports (torch, MONAI) live inside the commands so that `medseg --help` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from medseg.errors import MedsegError

app = typer.Typer(
    help="Train 3D medical image segmentation networks and run them on new scans.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)

@app.callback()
def _main() -> None:
    """Train 3D medical image segmentation networks and run them on new scans."""


SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable)."),
]


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Argument(help="Experiment config (overrides of configs/default.yaml).")] = None,
    set_: SetOption = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory from last.pt.")] = None,
) -> None:
    """Train a 3D U-Net on a dataset folder."""
    with _user_errors():
        from medseg import config as config_module
        from medseg.train import train as run_training

        if resume is not None and (config is not None or set_):
            raise MedsegError("--resume continues a run with its own config; give no CONFIG or --set with it")
        cfg = None if resume is not None else config_module.load(config, set_ or [])
        run_training(cfg, resume=resume, console=console)


class _user_errors:
    """Turn MedsegError into one line on stderr and exit code 2, without a traceback."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, MedsegError):
            errors.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2)
        if isinstance(error, KeyboardInterrupt):
            errors.print("interrupted")
            raise typer.Exit(code=130)
        return False


def main() -> None:
    """Entry point for `python -m medseg`."""
    app()
