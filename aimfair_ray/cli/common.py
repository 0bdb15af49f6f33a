"""What every command shares: the console, the config options, loading a config, and running a command
body (a user error is one line and exit 2; a run on an object store gets this command's logs at the end,
also after a failure)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, List, Optional

import click
import typer
from rich.console import Console

from aimfair_ray import AimfairError
from aimfair_ray.config import Config, load_config

# Wide enough for the audit table when output is a pipe or a CI log.
console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=True)

PresetOpt = typer.Option("cmnist", "--preset", "-p", help="config preset shipped with the package")
ConfigOpt = typer.Option(None, "--config", "-c", help="a YAML file merged over the preset (repeatable, later wins), "
                         "e.g. --config gpu --config my.yaml (cpu, gpu: the shipped resource layers)")
SetOpt = typer.Option(None, "--set", "-s", help="override a value: --set train.epochs=3 (repeatable)")
ForceOpt = typer.Option(False, "--force", help="redo the stage even if its outputs exist")
WandbOpt = typer.Option(False, "--wandb", help="log to W&B (offline by default)")


def log(msg: str) -> None:
    console.print(f"[cyan]{time.strftime('%H:%M:%S')}[/] {msg}", highlight=False)


class Bars:
    """Rich progress bars for ``aimfair_ray.progress`` on a terminal: one per running task (images of a set,
    a model's epochs, sweep trials), gone when it completes; the log lines print above them."""

    def __init__(self, out: Console):
        self.out = out
        self.bars = None
        self.tasks: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, task: str, done: int, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with self.lock:
            if self.bars is None:
                self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.out, transient=True)
                self.bars.start()
            if task not in self.tasks:
                self.tasks[task] = self.bars.add_task(task, total=total)
            self.bars.update(self.tasks[task], completed=done, total=total)
            if done >= total:
                self.bars.remove_task(self.tasks.pop(task))
                if not self.tasks:
                    self.stop()

    def stop(self) -> None:
        if self.bars is not None:
            self.bars.stop()
            self.bars, self.tasks = None, {}


BARS = Bars(console)


def quiet_console(cfg: Config) -> None:
    """Ray's output to ``runs/<name>/logs/`` (``aimfair_ray.ray_logs``) and, on a terminal, progress bars;
    ``--verbose`` leaves Ray's output on the console."""
    if VERBOSE:
        return
    from aimfair_ray import progress, ray_logs

    ray_logs.route(f"{cfg.run_dir}/logs", echo=log)
    if console.is_terminal:
        progress.set_sink(BARS)


def headline(name: str, r: dict) -> None:
    from aimfair_ray.evaluate import fmt

    console.print(f"[bold]{name}[/]: " + "  ".join(f"{m.upper()} {fmt(r, m)}" for m in ("acc", "wst", "std", "eo")),
                  highlight=False)


def _load(preset: str, config: Optional[List[str]], overrides: Optional[List[str]], wandb: bool) -> Config:
    cfg = load_config(preset, config or [], overrides or [])
    if wandb:
        from aimfair_ray.tracking import wandb_mode

        wandb_mode()  # online without a key, or no wandb package: one line now, not after the training
        cfg.train.wandb = True
    return cfg


VERBOSE = False  # `aimfair --verbose ...`: tracebacks too


def run(body: Callable[[], object]) -> object:
    """A command body that needs no config. A user error prints its one-line message and exits 2; an
    unexpected error prints one line and exits 1. ``--verbose`` adds the traceback to both."""
    try:
        return body()
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: the same command resumes where this one stopped", highlight=False)
        raise typer.Exit(130) from None
    except AimfairError as e:
        if VERBOSE:
            console.print_exception()
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from None
    except (typer.Exit, click.exceptions.ClickException, click.exceptions.Abort):
        raise  # a command's own exit status
    except Exception as e:  # noqa: BLE001 - an unexpected failure: one line unless --verbose
        if VERBOSE:
            raise
        from aimfair_ray import ray_logs

        where = f"; Ray's logs: {ray_logs.log_dir()}/" if ray_logs.log_dir() else ""
        console.print(f"[bold red]error:[/] {type(e).__name__}: {e} (unexpected; rerun with aimfair --verbose for "
                      f"the traceback{where})", highlight=False)
        raise typer.Exit(1) from None


def run_with_config(body: Callable[[Config], object], preset: str, config: Optional[List[str]],
                    overrides: Optional[List[str]], wandb: bool = False) -> object:
    """Load the config, run ``body(cfg)``; then, for a run on an object store, copy this command's logs there."""
    loaded: list[Config] = []

    def go():
        cfg = _load(preset, config, overrides, wandb)
        from aimfair_ray.runtime import check_store

        check_store(cfg.output_dir)  # a store that can't be written: one line, before anything starts
        loaded.append(cfg)
        quiet_console(cfg)
        try:
            return body(cfg)
        finally:
            BARS.stop()  # before any error line is printed

    try:
        return run(go)
    finally:
        if loaded:  # a run on an object store: this command's logs, also after a failure
            from aimfair_ray import ray_logs

            ray_logs.sync()
