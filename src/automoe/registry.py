"""The promotion gate, as a pure decision over registered versions.

A version is promoted to `champion` only when its BLEU and chrF reach the floors
(`min_bleu`, `min_chrf`: a model that does not translate never becomes champion, the first
registration included), its BLEU is not worse than the current champion's beyond
`bleu_tolerance` and its cost (latency or GFLOPs) is within the search budget. The decision
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
GATE, PREVIOUS, REVOKED = "automoe.gate", "automoe.previous_champion", "automoe.revoked"
CHAMPION, CANDIDATE = "champion", "candidate"


@dataclass(frozen=True)
class Gate:
    bleu_tolerance: float = 0.5  # BLEU points a new model may lose against the champion
    cost_tolerance: float = 0.1  # measured latency may exceed the budget by this fraction (timing noise)
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


def check(candidate: Version, champion: Version | None, gate: Gate) -> tuple[bool, str]:
    if not candidate.bleu >= gate.min_bleu:  # (a missing score, NaN, fails too)
        return False, f"BLEU {candidate.bleu:.2f} below the floor {gate.min_bleu:g}"
    if gate.min_chrf > 0 and not candidate.chrf >= gate.min_chrf:
        return False, f"chrF {candidate.chrf:.2f} below the floor {gate.min_chrf:g}"
    if candidate.cost > candidate.budget * (1 + gate.cost_tolerance):
        return False, f"cost {candidate.cost:.4g} over the budget {candidate.budget:.4g}"
    if champion is not None and candidate.bleu < champion.bleu - gate.bleu_tolerance:
        return (
            False,
            f"BLEU {candidate.bleu:.2f} < champion v{champion.number} {champion.bleu:.2f} - {gate.bleu_tolerance}",
        )
    return True, "passed" if champion is None else f"BLEU {candidate.bleu:.2f} vs champion {champion.bleu:.2f}"


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
