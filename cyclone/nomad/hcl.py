"""A tiny HCL writer for Nomad job files: blocks, attributes, heredocs; nothing clever.

Strings are written as HCL quoted strings with `\\` and `"` escaped; `${NOMAD_...}` stays as is
on purpose (Nomad interpolates runtime variables such as `${NOMAD_PORT_grpc}` itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

Value = Union[str, int, float, bool, Sequence["Value"], Mapping[str, "Value"], "Heredoc"]


@dataclass(frozen=True)
class Heredoc:
    """A multi-line string written as `<<-EOT ... EOT` (template data)."""

    text: str


@dataclass
class Block:
    type: str
    labels: tuple[str, ...] = ()
    body: list[tuple[str, Value] | Block] = field(default_factory=list)

    def attr(self, key: str, value: Value) -> Block:
        self.body.append((key, value))
        return self

    def block(self, type_: str, *labels: str) -> Block:
        child = Block(type_, tuple(labels))
        self.body.append(child)
        return child

    def add(self, child: Block) -> Block:
        self.body.append(child)
        return self


def quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _value(value: Value, indent: str) -> str:
    if isinstance(value, Heredoc):
        if "\nEOT\n" in f"\n{value.text}\n":
            raise ValueError("heredoc: text must not contain a line 'EOT'")
        text = value.text if value.text.endswith("\n") else value.text + "\n"
        return f"<<EOT\n{text}EOT"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, Mapping):
        inner = indent + "  "
        items = "".join(f"{inner}{quote(k)} = {_value(v, inner)}\n" for k, v in value.items())
        return "{\n" + items + indent + "}"
    return "[" + ", ".join(_value(v, indent) for v in value) + "]"


def dumps(block: Block, indent: str = "") -> str:
    head = " ".join([block.type, *(quote(label) for label in block.labels)])
    lines = [f"{indent}{head} {{"]
    inner = indent + "  "
    runs: list[list[tuple[str, Value]] | Block] = []
    for entry in block.body:
        if isinstance(entry, Block):
            runs.append(entry)
        elif runs and isinstance(runs[-1], list):
            runs[-1].append(entry)
        else:
            runs.append([entry])
    for i, run in enumerate(runs):
        if i:
            lines.append("")
        if isinstance(run, Block):
            lines.append(dumps(run, inner))
            continue
        width = max(len(key) for key, _ in run)  # aligned like `nomad fmt`, per run
        lines += [f"{inner}{key.ljust(width)} = {_value(value, inner)}" for key, value in run]
    lines.append(f"{indent}}}")
    return "\n".join(lines)
