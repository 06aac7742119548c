"""Pareto front of (cost, loss) pairs: nothing else is both cheaper and better."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def pareto_front(items: Sequence[T], cost, loss) -> list[T]:
    """Non-dominated items, sorted by cost (ascending) and so by loss (descending)."""
    front, best_loss = [], float("inf")
    for item in sorted(items, key=lambda i: (cost(i), loss(i))):
        if loss(item) < best_loss:
            front.append(item)
            best_loss = loss(item)
    return front
