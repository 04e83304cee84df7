"""Activation memory: tensor lifetimes over a topological order and a greedy-by-size arena plan.

The planner is the one TensorFlow Lite (Micro) uses for its arena: tensors sorted by size, largest first,
each placed at the lowest offset where it overlaps no already placed tensor that is alive at the same time
(first fit). The arena size is what a runtime that plans ahead needs; the peak of live bytes is the lower
bound no plan can beat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """One tensor in the arena: offset and size in bytes, alive from step ``first`` to ``last`` inclusive."""

    name: str
    offset: int
    size: int
    first: int
    last: int


@dataclass(frozen=True)
class ArenaPlan:
    """An arena plan: its size, the peak of simultaneously live bytes, and where each tensor sits."""

    arena_bytes: int
    peak_live_bytes: int
    peak_step: int
    placements: list[Placement]


def lifetimes(
    steps: Sequence[tuple[Sequence[str], Sequence[str]]], graph_inputs: Sequence[str], graph_outputs: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """(first, last) step of every tensor: made at its producing step (graph inputs at 0), kept until its
    last consumer runs (graph outputs until the last step)."""
    end = max(len(steps) - 1, 0)
    span: dict[str, tuple[int, int]] = {name: (0, 0) for name in graph_inputs}
    for i, (inputs, outputs) in enumerate(steps):
        for name in outputs:
            span.setdefault(name, (i, i))
        for name in inputs:
            if name in span:
                span[name] = (span[name][0], max(span[name][1], i))
    for name in graph_outputs:
        if name in span:
            span[name] = (span[name][0], end)
    return span


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def plan_arena(
    steps: Sequence[tuple[Sequence[str], Sequence[str]]],
    sizes: dict[str, int],
    graph_inputs: Sequence[str],
    graph_outputs: Sequence[str],
    *,
    alignment: int = 16,
) -> ArenaPlan:
    """Plan the activation arena of a graph given as (inputs, outputs) per step in execution order."""
    span = lifetimes(steps, graph_inputs, graph_outputs)
    tensors = [(name, sizes.get(name, 0), *span[name]) for name in span if sizes.get(name, 0) > 0]
    live = [0] * max(len(steps), 1)
    for _, size, first, last in tensors:
        for step in range(first, last + 1):
            live[step] += size
    peak = max(live)
    placed: list[Placement] = []
    for name, size, first, last in sorted(tensors, key=lambda t: (-t[1], t[2], t[0])):
        overlapping = sorted((p for p in placed if p.first <= last and first <= p.last), key=lambda p: p.offset)
        offset = 0
        for other in overlapping:
            if offset + size <= other.offset:
                break
            offset = max(offset, _align(other.offset + other.size, alignment))
        placed.append(Placement(name, offset, size, first, last))
    arena = max((p.offset + p.size for p in placed), default=0)
    return ArenaPlan(arena_bytes=arena, peak_live_bytes=peak, peak_step=live.index(peak),
                     placements=sorted(placed, key=lambda p: (p.first, p.name)))
