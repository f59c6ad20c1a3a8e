"""`tora models`: the backend kinds, the models under $TORA_HOME/models, and converting GGUF for vLLM.

    tora models [list]                       the backend kinds and their spec syntax (plugins
                                             included), then the local models and the spec of each
    tora models kinds [--json]               the backend kinds only
    tora models convert embedded [--out DIR] an embedded GGUF (or embedded-tiny) -> a safetensors directory
    tora models convert FILE.gguf [--out DIR]

`convert` prints the directory on stdout (progress goes to stderr), so
`vllm:$(tora models convert FILE.gguf)` is a spec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tora import embedded_models
from tora.backends.convert import DEFAULT_DTYPE, convert, default_out, read_stamp, resolve_source
from tora.backends.registry import kinds
from tora.errors import BackendError
from tora.paths import models_dir


@click.group("models", invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """List backend kinds and local models; convert GGUF models to Hugging Face directories (for vllm:)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_cmd)


def _kinds_table() -> Table:
    table = Table(title="backend kinds (--model SPEC)")
    for column in ("kind", "spec", "serves", "from"):
        table.add_column(column, overflow="fold")
    for kind in kinds():
        # Text, not markup: a syntax like "[MODEL@]" or an error's "[Errno 2]" is not a style.
        about = Text(kind.about) if kind.error is None else Text(f"not usable: {kind.error}", style="red")
        table.add_row(Text(kind.name), Text(kind.syntax), about, Text(kind.source))
    return table


@models.command("kinds")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per kind on stdout.")
def kinds_cmd(as_json: bool) -> None:
    """The backend kinds a --model spec can name, with their syntax (entry-point plugins included)."""
    if as_json:
        for kind in kinds():
            sys.stdout.write(json.dumps(dataclasses.asdict(kind)) + "\n")
        return
    Console().print(_kinds_table())


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _embedded_shas() -> dict[str, str]:
    """The pinned sha256 of each embedded model whose package is installed, by spec."""
    shas: dict[str, str] = {}
    for spec, model in embedded_models.MODELS.items():
        with contextlib.suppress(BackendError):
            shas[spec] = embedded_models.expected_sha256(model)
    return shas


def _entries(root: Path) -> list[dict[str, Any]]:
    if not root.is_dir():
        return []
    shas = _embedded_shas()
    by_file = {embedded_models.target_path(embedded_models.MODELS[spec]).name: spec for spec in shas}
    rows: list[dict[str, Any]] = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):  # locks and conversions in progress
            continue
        row: dict[str, Any] = {"name": path.name, "path": str(path), "bytes": _size(path)}
        if path.is_file() and path.suffix == ".gguf":
            spec = by_file.get(path.name) if path.with_name(path.name + ".verified").is_file() else None
            row |= {"format": "gguf", "spec": spec or f"gguf:{path}",
                    "note": f"the {spec} model, verified" if spec else ""}
        elif path.is_dir() and (path / "config.json").is_file():
            stamp = read_stamp(path)
            row |= {"format": "hf", "spec": f"vllm:{path}", "note": ""}
            if stamp is not None:
                sha = str(stamp.get("source_sha256", ""))
                source = stamp.get("source", "?")
                current = source in shas and sha == shas[source]
                if current:
                    row["spec"] = f"vllm:{source}"
                stale = source in embedded_models.MODELS and not current
                row["note"] = (f"converted from {source} ({stamp.get('dtype', '?')}, sha256 {sha[:12]})"
                               + (": stale, the embedded model changed since" if stale else ""))
        else:
            continue
        rows.append(row)
    return rows


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model on stdout.")
def list_cmd(as_json: bool) -> None:
    """The backend kinds, then the models under $TORA_HOME/models and the --model spec for each
    (with --json: the models only, see `tora models kinds --json`)."""
    root = models_dir()
    rows = _entries(root)
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
        return
    console = Console()
    console.print(_kinds_table())
    if not rows:
        console.print(f"no models in {root} yet (the embedded model is assembled at its first use)", highlight=False)
        return
    table = Table(title=str(root))
    for column in ("name", "format", "size", "spec", "note"):
        table.add_column(column, justify="right" if column == "size" else "left", overflow="fold")
    for row in rows:
        table.add_row(row["name"], row["format"], f"{row['bytes'] / 1e6:.0f} MB", row["spec"], row["note"])
    console.print(table)


@models.command("convert")
@click.argument("source")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Target directory [default: $TORA_HOME/models/<gguf name>-hf].")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=DEFAULT_DTYPE,
              show_default=True, help="Weight type of the dequantised model.")
def convert_cmd(source: str, out: Path | None, dtype: str) -> None:
    """Dequantise SOURCE (`embedded`, `embedded-tiny` or a .gguf file) into a safetensors directory that vLLM loads."""
    err = Console(stderr=True)
    src = resolve_source(source)
    target = (out or default_out(src)).expanduser().absolute()
    done = convert(src, target, dtype=dtype, notify=lambda line: err.print(line, highlight=False))
    sys.stdout.write(f"{done}\n")
    sys.stdout.flush()
    err.print(f"ready: --model vllm:{source if source in embedded_models.MODELS and out is None else done}",
              highlight=False)
