"""The `tora` command: one click group, one module per verb.

Exit codes: 0 ok/answered, 1 runtime failure, 2 usage error, 3 no answer
(solve), 4 a re-executed cell differs from its record (replay), 130 interrupted.
"""

from __future__ import annotations

import sys

import click

from sandbox.errors import SandboxError
from tora import __version__
from tora.errors import ToraError

EXIT_INTERRUPTED = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tora")
def cli() -> None:
    """tora: tool-integrated reasoning. A model writes reasoning and Python,
    a sandboxed Jupyter kernel runs it, and every step is recorded."""


def _register() -> None:
    from tora.cli.solve import solve

    cli.add_command(solve)
    optional = [
        ("tora.cli.sandbox", "sandbox"),
        ("tora.cli.grade", "grade"),
        ("tora.cli.eval", "eval_cmd"),
        ("tora.cli.replay", "replay"),
        ("tora.cli.export", "export"),
        ("tora.cli.report", "report"),
        ("tora.cli.curate", "curate"),
        ("tora.cli.correct", "correct"),
        ("tora.cli.serve", "serve"),
        ("tora.cli.lmeval", "lm_eval"),
        ("tora.cli.models", "models"),
    ]
    for module, attr in optional:
        try:
            mod = __import__(module, fromlist=[attr])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        cli.add_command(getattr(mod, attr))


_register()


def main(argv: list[str] | None = None) -> None:
    try:
        code = cli.main(args=argv, prog_name="tora", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except ToraError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except SandboxError as exc:  # the one place a sandbox failure becomes tora's exit 1, for every verb
        click.echo(f"error: sandbox failure: {exc}", err=True)
        sys.exit(ToraError.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
