"""The ``aimfair`` command line: one command per stage, and ``demo`` for the whole chain.

Commands by group: :mod:`.stages` (data, generate, train, finetune, audit, demo),
:mod:`.results` (benchmark, minmax, sweep), :mod:`.cluster` (serve, submit, jobs) and
:mod:`.configs` (config). The work itself is in :mod:`aimfair_ray.pipeline` and the stages.
"""

from __future__ import annotations

import typer

from aimfair_ray.cli import cluster, common, configs, results, stages

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v",
                                          help="on an error, also print its traceback (aimfair --verbose COMMAND ...)")):
    common.VERBOSE = verbose

for group in (stages, results, cluster, configs):
    for name, sub in group.GROUPS.items():
        app.add_typer(sub, name=name)


def main() -> None:  # pragma: no cover
    app()
