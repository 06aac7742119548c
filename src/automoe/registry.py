"""The promotion gate, as a pure decision over registered versions.

A version is promoted to `champion` only when its BLEU and chrF reach the floors
(`min_bleu`, `min_chrf`: a model that does not translate never becomes champion, the first
registration included), its BLEU is not worse than the current champion's beyond
`bleu_tolerance` and its cost (latency or GFLOPs) is within the search budget plus
`cost_tolerance`, within the noise its measurement showed: a latency is timed in several
alternating rounds, and a version passes when the low end of its rounds is within the
limit (refused, with the figures, when even that is over). The decision
is a fold in version order from the current champion over the undecided versions
registered after it, so concurrent registrations that each re-run it converge on the
same champion, and the previous champion is recorded on the new one before the alias
moves (it is never lost; `rollback` follows that record).
"""

from __future__ import annotations

from dataclasses import dataclass

# version tags
BLEU, CHRF = "automoe.bleu", "automoe.chrf"
COST, BUDGET = "automoe.gate_cost", "automoe.gate_budget"  # cost: ms or GFLOPs
COST_LOW, COST_HIGH = "automoe.gate_cost_low", "automoe.gate_cost_high"  # the range over the timing rounds
REFERENCE, UNIT = "automoe.gate_reference", "automoe.gate_unit"  # the dense baseline's cost; ms | GFLOPs
GATE, PREVIOUS, REVOKED = "automoe.gate", "automoe.previous_champion", "automoe.revoked"
CHAMPION, CANDIDATE = "champion", "candidate"


@dataclass(frozen=True)
class Gate:
    bleu_tolerance: float = 0.5  # BLEU points a new model may lose against the champion
    cost_tolerance: float = 0.05  # measured latency may exceed the budget by this fraction (one more process)
    min_bleu: float = 0.0  # floors: below either, a version is never promoted
    min_chrf: float = 0.0


@dataclass(frozen=True)
class Version:
    number: int
    bleu: float
    cost: float  # measured latency (ms) or GFLOPs, in the unit of the search budget
    budget: float
    decided: bool = False  # already promoted, superseded or rejected by an earlier decision
    revoked: bool = False  # rolled back or replaced by a person
    chrf: float = float("nan")
    cost_low: float = float("nan")  # the cost's range over the timing rounds (NaN: one figure)
    cost_high: float = float("nan")
    reference: float = float("nan")  # the dense baseline's cost, in the cost's unit (NaN: no ratio)
    unit: str = ""  # ms | GFLOPs

    @property
    def low(self) -> float:
        return self.cost if self.cost_low != self.cost_low else min(self.cost_low, self.cost)


def describe_cost(v: Version, gate: Gate) -> str:
    """The cost against the limit, in the budget's unit and, relative to dense, as ratios."""
    limit = v.budget * (1 + gate.cost_tolerance)
    unit = f" {v.unit}" if v.unit else ""
    ratio = v.reference == v.reference and v.reference > 0

    def amount(x: float) -> str:
        return f"{x:.4g}{unit}" + (f" = {x / v.reference:.3f}x dense" if ratio else "")

    spread = ""
    if v.cost_low == v.cost_low and v.cost_high == v.cost_high:
        lo, hi = (v.cost_low / v.reference, v.cost_high / v.reference) if ratio else (v.cost_low, v.cost_high)
        spread = f" (rounds {lo:.3f}-{hi:.3f}{'x' if ratio else unit})"
    return (
        f"cost {amount(v.cost)}{spread}, limit {amount(limit)} (budget {amount(v.budget)} + {gate.cost_tolerance:.0%})"
    )


def check(candidate: Version, champion: Version | None, gate: Gate) -> tuple[bool, str]:
    if not candidate.bleu >= gate.min_bleu:  # (a missing score, NaN, fails too)
        return False, f"BLEU {candidate.bleu:.2f} below the floor {gate.min_bleu:g}"
    if gate.min_chrf > 0 and not candidate.chrf >= gate.min_chrf:
        return False, f"chrF {candidate.chrf:.2f} below the floor {gate.min_chrf:g}"
    if not candidate.low <= candidate.budget * (1 + gate.cost_tolerance):  # over even at the low end of its rounds
        return False, f"over the budget: {describe_cost(candidate, gate)}"
    if champion is not None and candidate.bleu < champion.bleu - gate.bleu_tolerance:
        return (
            False,
            f"BLEU {candidate.bleu:.2f} < champion v{champion.number} {champion.bleu:.2f} - {gate.bleu_tolerance}",
        )
    within = f"within the budget: {describe_cost(candidate, gate)}"
    if champion is None:
        return True, f"passed; {within}"
    return True, f"BLEU {candidate.bleu:.2f} vs champion {champion.bleu:.2f}; {within}"


def decide(champion: Version | None, versions: list[Version], gate: Gate) -> tuple[Version | None, dict[int, str]]:
    """The champion after considering every undecided version newer than the current one,
    and the verdict on each of them ('promoted', 'superseded' or 'rejected: why')."""
    floor = champion.number if champion is not None else 0
    pending = sorted(
        (v for v in versions if v.number > floor and not v.decided and not v.revoked), key=lambda v: v.number
    )
    best, verdicts, passed = champion, {}, []
    for v in pending:
        ok, why = check(v, best, gate)
        if ok:
            passed.append(v.number)
            best = v
        else:
            verdicts[v.number] = f"rejected: {why}"
    for number in passed:
        verdicts[number] = "promoted" if best is not None and number == best.number else "superseded"
    return best, verdicts
