"""Evolutionary search over a SearchSpace under a cost budget (HAT / AutoMoE).

Each iteration keeps the `parents` fittest archs, adds `mutations` mutated parents and
`crossovers` children of two parents; a child over budget is redrawn. Fitness is lower
= better (validation loss). The state after every iteration is saved, so a killed
search resumes and ends exactly where an uninterrupted one would. A random-search
baseline spends the same number of fitness evaluations.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from automoe.errors import ConfigError
from automoe.io import atomic_write_json
from automoe.space import ArchConfig, SearchSpace

Fitness = Callable[[list[ArchConfig]], list[float]]
Cost = Callable[[ArchConfig], float]


def key(arch: ArchConfig) -> str:
    return json.dumps(arch.to_dict(), separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class EvolutionConfig:
    population: int = 125
    parents: int = 25
    mutations: int = 50
    crossovers: int = 50
    mutation_prob: float = 0.3
    iterations: int = 30
    max_tries: int = 2000  # redraws of an over-budget child (or initial sample) before giving up

    def __post_init__(self) -> None:
        for name in ("population", "parents", "iterations", "max_tries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.parents > self.population:
            raise ValueError(f"parents ({self.parents}) cannot exceed population ({self.population})")
        if self.mutations < 0 or self.crossovers < 0:
            raise ValueError("mutations and crossovers must be >= 0")
        if not 0 <= self.mutation_prob <= 1:
            raise ValueError(f"mutation_prob must be in [0, 1], got {self.mutation_prob}")


@dataclass
class Candidate:
    arch: ArchConfig
    fitness: float
    cost: float


@dataclass
class SearchResult:
    best: Candidate
    population: list[Candidate]
    evaluated: list[Candidate]  # every arch scored, in order of evaluation
    history: list[dict[str, float]] = field(default_factory=list)


class Scorer:
    """Fitness and cost with a cache: each arch is scored once."""

    def __init__(self, fitness: Fitness, cost: Cost):
        self.fitness, self.cost = fitness, cost
        self.scores: dict[str, tuple[float, float]] = {}
        self.order: list[str] = []
        self.archs: dict[str, ArchConfig] = {}
        self._costs: dict[str, float] = {}

    def cost_of(self, arch: ArchConfig) -> float:
        k = key(arch)
        if k not in self._costs:
            self._costs[k] = float(self.cost(arch))
        return self._costs[k]

    def score(self, archs: list[ArchConfig]) -> list[Candidate]:
        new = list({key(a): a for a in archs if key(a) not in self.scores}.values())
        if new:
            for arch, value in zip(new, self.fitness(new), strict=True):
                k = key(arch)
                self.scores[k] = (float(value), self.cost_of(arch))
                self.order.append(k)
                self.archs[k] = arch
        return [Candidate(a, *self.scores[key(a)]) for a in archs]

    def evaluated(self) -> list[Candidate]:
        return [Candidate(self.archs[k], *self.scores[k]) for k in self.order]


def feasible_sample(
    space: SearchSpace, scorer: Scorer, budget: float, rng: np.random.Generator, tries: int
) -> ArchConfig:
    for _ in range(tries):
        arch = space.sample(rng)
        if scorer.cost_of(arch) <= budget:
            return arch
    raise ConfigError(f"search.budget: no arch under {budget:g} in {tries} samples; raise the budget")


def evolve(
    space: SearchSpace,
    cfg: EvolutionConfig,
    fitness: Fitness,
    cost: Cost,
    budget: float,
    seed: int,
    state_path: Path | None = None,
    progress: Callable[[int], None] | None = None,
    on_save: Callable[[Path], None] | None = None,
) -> SearchResult:
    """Evolutionary search; its state is saved to `state_path` after every iteration (and
    `on_save` called with it: the run store keeps it beyond the pod) and resumed from there."""
    scorer = Scorer(fitness, cost)
    rng = np.random.default_rng(seed)
    state = _load(state_path, seed, budget, cfg)
    if state is not None:
        rng.bit_generator.state = state["rng"]
        for k, (fit, c) in state["scores"].items():
            arch = ArchConfig.from_dict(json.loads(k))
            scorer.scores[k], scorer.archs[k], scorer._costs[k] = (fit, c), arch, c
        scorer.order = list(state["order"])
        population = [ArchConfig.from_dict(json.loads(k)) for k in state["population"]]
        history, start = state["history"], state["iteration"] + 1
    else:
        population, seen = [], set()
        for _ in range(cfg.population * cfg.max_tries):
            if len(population) == cfg.population:
                break
            arch = feasible_sample(space, scorer, budget, rng, cfg.max_tries)
            if key(arch) not in seen:
                seen.add(key(arch))
                population.append(arch)
        history, start = [], 1
    ranked = _rank(scorer.score(population))
    if state is None:
        history.append(_summary(0, ranked, scorer))
        _save(state_path, 0, ranked, scorer, rng, history, seed, budget, cfg)
        if on_save and state_path is not None:
            on_save(state_path)

    for iteration in range(start, cfg.iterations + 1):
        parents = [c.arch for c in ranked[: cfg.parents]]
        children = [
            _child(scorer, budget, cfg.max_tries, _mutant, space, parents, cfg.mutation_prob, rng)
            for _ in range(cfg.mutations)
        ]
        children += [
            _child(scorer, budget, cfg.max_tries, _crossover, space, parents, cfg.mutation_prob, rng)
            for _ in range(cfg.crossovers)
        ]
        ranked = _rank(scorer.score(parents + children))
        history.append(_summary(iteration, ranked, scorer))
        _save(state_path, iteration, ranked, scorer, rng, history, seed, budget, cfg)
        if on_save and state_path is not None:
            on_save(state_path)
        if progress:
            progress(iteration)
    return SearchResult(ranked[0], ranked, scorer.evaluated(), history)


def random_search(
    space: SearchSpace, evaluations: int, fitness: Fitness, cost: Cost, budget: float, seed: int, max_tries: int = 2000
) -> SearchResult:
    """Uniformly sampled archs under the budget, `evaluations` distinct ones scored."""
    scorer = Scorer(fitness, cost)
    rng = np.random.default_rng([seed, 1])
    archs, seen = [], set()
    for _ in range(evaluations * max_tries):
        if len(archs) == evaluations:
            break
        arch = feasible_sample(space, scorer, budget, rng, max_tries)
        if key(arch) not in seen:
            seen.add(key(arch))
            archs.append(arch)
    ranked = _rank(scorer.score(archs))
    running = np.minimum.accumulate([c.fitness for c in scorer.evaluated()])
    history = [{"evaluations": float(i + 1), "best_fitness": float(v)} for i, v in enumerate(running)]
    return SearchResult(ranked[0], ranked, scorer.evaluated(), history)


def _mutant(space: SearchSpace, parents: list[ArchConfig], prob: float, rng) -> ArchConfig:
    return space.mutate(parents[rng.integers(len(parents))], prob, rng)


def _crossover(space: SearchSpace, parents: list[ArchConfig], prob: float, rng) -> ArchConfig:
    return space.crossover(parents[rng.integers(len(parents))], parents[rng.integers(len(parents))], rng)


def _child(scorer: Scorer, budget: float, tries: int, make, *args) -> ArchConfig:
    """A child under the budget: redraw (mutate / cross again) until one fits."""
    for _ in range(tries):
        child = make(*args)
        if scorer.cost_of(child) <= budget:
            return child
    raise ConfigError(f"search: no child under the budget {budget:g} after {tries} tries")


def _rank(cands: list[Candidate]) -> list[Candidate]:
    unique = {key(c.arch): c for c in cands}
    return sorted(unique.values(), key=lambda c: (c.fitness, key(c.arch)))


def _summary(iteration: int, ranked: list[Candidate], scorer: Scorer) -> dict[str, float]:
    return {
        "iteration": float(iteration),
        "best_fitness": ranked[0].fitness,
        "mean_fitness": float(np.mean([c.fitness for c in ranked])),
        "best_cost": ranked[0].cost,
        "evaluations": float(len(scorer.order)),
    }


def _save(path, iteration, ranked, scorer, rng, history, seed, budget, cfg) -> None:
    if path is None:
        return
    atomic_write_json(
        path,
        {
            "iteration": iteration,
            "population": [key(c.arch) for c in ranked],
            "order": scorer.order,
            "scores": {k: list(v) for k, v in scorer.scores.items()},
            "rng": rng.bit_generator.state,
            "history": history,
            "seed": seed,
            "budget": budget,
            "config": cfg.__dict__,
        },
    )


def _load(path: Path | None, seed: int, budget: float, cfg: EvolutionConfig) -> dict | None:
    if path is None or not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("seed") != seed or state.get("budget") != budget or state.get("config") != cfg.__dict__:
        return None  # a different search: start over
    return state
