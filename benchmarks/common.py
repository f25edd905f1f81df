"""Helpers shared by the benchmark scripts: machine description, interleaved timing (from the library), tables."""

from __future__ import annotations

from asqpost.timing import interleaved_medians
from asqpost.timing import machine_description as machine

__all__ = ["interleaved_medians", "machine", "table"]


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
