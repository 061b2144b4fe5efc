"""How a tune chooses: one rule per benchmark, and one selection code for every benchmark and the toy world.

A rule names the metric to optimise and, where a method could win it by giving up something else, a *floor*:
a second metric that must stay within ``floor`` of regular decoding's (CHAIR: a method that only shortens
captions lowers CHAIR_i and loses recall). Among the settings above the floor, the best metric wins, ties going
to the higher floor metric and then to the earlier setting (the official one comes first); where none is above
the floor, the one that keeps the floor metric best is taken and marked ``admissible: false``, never the most
aggressive.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["Rule", "rule_for", "select"]


@dataclass(frozen=True)
class Rule:
    """What a tune optimises.

    Attributes:
        metric: the metric's name in ``metrics.json``, or a function of the metrics (the toy world's objective).
        lower_is_better: minimise it (CHAIR_i, a hallucination rate) rather than maximise it.
        floor_metric: a higher-is-better metric that must stay within ``floor`` of regular decoding's; ``None``:
            no floor.
        floor: how far below regular's the floor metric may fall, in its own unit (CHAIR's recall: points).
        name: what the metric is called in ``tuning.json`` when it is a function.
    """

    metric: str | Callable[[Mapping[str, float]], float]
    lower_is_better: bool = False
    floor_metric: str | None = None
    floor: float = 0.0
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or str(self.metric)

    def value(self, metrics: Mapping[str, float]) -> float:
        if callable(self.metric):
            return float(self.metric(metrics))
        if self.metric not in metrics:
            raise ConfigError(f"the tune's metric {self.metric!r} is not among the run's ({', '.join(metrics)})")
        return float(metrics[self.metric])

    def words(self) -> str:
        """The rule in one sentence, for ``tuning.json`` and the docs."""
        best = "lowest" if self.lower_is_better else "highest"
        text = f"per method, the {best} {self.label} on the dev split"
        if self.floor_metric:
            text += (
                f" among settings whose {self.floor_metric} is at least regular decoding's minus {self.floor:g}; where "
                f"none qualifies, the one with the highest {self.floor_metric}, marked admissible=false"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.label,
            "lower_is_better": self.lower_is_better,
            "floor_metric": self.floor_metric,
            "floor": self.floor,
            "words": self.words(),
        }


#: benchmark -> (metrics a user may optimise, the first the default; lower is better; floor metric; default floor)
RULES: dict[str, tuple[tuple[str, ...], bool, str | None, float]] = {
    "pope": (("accuracy", "f1"), False, None, 0.0),
    "chair": (("CHAIR_i", "CHAIR_s"), True, "recall", 2.0),
    "mme": (("total", "perception", "hallucination"), False, None, 0.0),
    "vlind": (("S_LP", "LP"), False, None, 0.0),
    "amber": (("f1", "accuracy"), False, None, 0.0),
}


def rule_for(benchmark: str, metric: str | None = None, floor: float | None = None) -> Rule:
    """The benchmark's rule (:data:`RULES`), with ``metric`` and ``floor`` as the user chose them."""
    if benchmark not in RULES:
        raise ConfigError(f"no tuning rule for {benchmark!r}; tune one of {', '.join(RULES)}")
    metrics, lower, floor_metric, default_floor = RULES[benchmark]
    metric = metric or metrics[0]
    if metric not in metrics:
        raise ConfigError(f"--metric {metric!r}: {benchmark} tunes on {' or '.join(metrics)}")
    if floor is not None and floor_metric is None:
        raise ConfigError(f"--floor applies to chair only ({benchmark}'s rule has no floor metric); leave it unset")
    if floor is not None and floor < 0:
        raise ConfigError(f"--floor {floor:g} must be >= 0 (points of {floor_metric} below regular's)")
    return Rule(metric, lower, floor_metric, default_floor if floor is None else floor)


def select(results: Sequence[Mapping[str, Any]], rule: Rule, reference: Mapping[str, float]) -> dict[str, Any]:
    """The chosen entry of ``results`` (each ``{"settings": ..., "metrics": ...}``, the official setting first)
    under ``rule``, with regular decoding's metrics ``reference`` setting the floor; returns the entry with
    ``score`` and ``admissible`` added."""
    if not results:
        raise ConfigError("nothing to choose from: the grid is empty")
    sign = 1.0 if rule.lower_is_better else -1.0
    keyed = [(sign * rule.value(r["metrics"]), i, r) for i, r in enumerate(results)]
    if rule.floor_metric is None:
        _, _, best = min(keyed, key=lambda k: (k[0], k[1]))
        return {**best, "score": rule.value(best["metrics"]), "admissible": True}
    floor = float(reference[rule.floor_metric]) - rule.floor
    kept = [k for k in keyed if float(k[2]["metrics"][rule.floor_metric]) >= floor - 1e-12]
    if kept:
        _, _, best = min(kept, key=lambda k: (k[0], -float(k[2]["metrics"][rule.floor_metric]), k[1]))
    else:
        _, _, best = max(keyed, key=lambda k: (float(k[2]["metrics"][rule.floor_metric]), -k[0], -k[1]))
    return {**best, "score": rule.value(best["metrics"]), "admissible": bool(kept)}
