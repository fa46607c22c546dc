"""The ``ctpo`` command. Commands are thin: each imports its implementation lazily, so start-up stays fast
(``import verl`` alone takes seconds) and ``ctpo --help`` never touches torch or verl."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

app = typer.Typer(
    name="ctpo",
    help="Which importance-sampling ratio should a policy-gradient trainer use? GRPO vs GSPO vs CTPO.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks: timings as ratios against a named baseline in the same run.")
app.add_typer(bench_app, name="bench")

console = Console()


class UserError(Exception):
    """A problem with what the user asked for; shown as one line, never a traceback."""


@app.command()
def methods() -> None:
    """Table of every method: its IS ratio, clip rule, default hyperparameters and paper."""
    from rich.table import Table

    from ctpo_cli.losses import METHODS

    table = Table(title="IS-ratio methods (ctpo_cli.losses)")
    for column in ("method", "ratio", "clip rule", "defaults", "paper"):
        table.add_column(column, overflow="fold")
    for m in METHODS.values():
        defaults = ", ".join(f"{k}={v:.4g}" for k, v in m.defaults.items())
        if m.fixed_agg_mode:
            defaults += f", agg={m.fixed_agg_mode}"
        table.add_row(m.name, m.ratio, m.clip_rule, defaults, m.paper)
    console.print(table)


@bench_app.command("loss")
def bench_loss(
    batch: int = typer.Option(64, help="Responses per micro-batch."),
    length: int = typer.Option(8192, help="Tokens per response."),
    repeats: int = typer.Option(5, help="Timed forward+backward passes per method (after one warm-up)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    out: str = typer.Option("", help="Also write the table as CSV here."),
) -> None:
    """Time forward+backward of every method against verl's built-in `vanilla` loss (same run)."""
    from ctpo_cli.bench import bench_losses

    bench_losses(batch=batch, length=length, repeats=repeats, device=device, out=out or None, console=console)


def main() -> None:
    """Entry point: user errors become one red line (CTPO_DEBUG=1 shows the traceback)."""
    try:
        app()
    except (UserError, ValueError, FileNotFoundError) as error:
        if os.environ.get("CTPO_DEBUG"):
            raise
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
