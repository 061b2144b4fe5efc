"""Statistics of the training world (object frequencies, co-occurrence), and the ask probabilities that put the
language prior into the training text."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from .scenes import sample_scene
from .world import WorldConfig

__all__ = ["TrainStatistics", "ask_probabilities", "train_statistics"]


@dataclass(frozen=True)
class TrainStatistics:
    """Object frequencies and pairwise co-occurrence counts over the first ``n`` training scenes."""

    n: int
    frequency: dict[str, int]
    cooccurrence: dict[tuple[str, str], int]

    def presence(self, name: str) -> float:
        return self.frequency[name] / self.n

    def popular(self) -> list[str]:
        """Objects by training frequency, most frequent first (ties: vocabulary order)."""
        return sorted(self.frequency, key=lambda o: -self.frequency[o])

    def cooccurring(self, name: str, candidates: Sequence[str]) -> list[str]:
        """``candidates`` by how often they appear with ``name``, most first (ties keep the given order)."""
        return sorted(candidates, key=lambda o: -self.cooccurrence[(name, o)])


@functools.lru_cache(maxsize=16)
def train_statistics(config: WorldConfig) -> TrainStatistics:
    """Statistics of the training images: the first ``stats_images`` scenes of the training stream."""
    freq = dict.fromkeys(config.objects, 0)
    co = {(a, b): 0 for a in config.objects for b in config.objects}
    for i in range(config.stats_images):
        present = list(sample_scene(config, "train", i, layout=False).objects)
        for a in present:
            freq[a] += 1
            for b in present:
                if a != b:
                    co[(a, b)] += 1
    return TrainStatistics(config.stats_images, freq, co)


def _ask_pair(presence: float, target: float) -> tuple[float, float]:
    """(ask if present, ask if absent) giving P(yes | asked) = target, asking as much as possible."""
    odds, natural = target / (1 - target), presence / (1 - presence)
    return (1.0, natural / odds) if natural <= odds else (odds / natural, 1.0)


@functools.lru_cache(maxsize=16)
def ask_probabilities(config: WorldConfig) -> dict[str, tuple[float, float]]:
    """object -> (P(asked | present), P(asked | absent)) of a training existence question.

    Favoured objects get P(yes | asked) = ``language_prior``; the others share the absent-ask probability
    that makes the overall yes rate ``yes_rate`` (measured presence rates from :func:`train_statistics`).
    Raises ValueError when no such probabilities exist.
    """
    stats = train_statistics(config)
    pres = {o: stats.presence(o) for o in config.objects}
    out = {o: _ask_pair(pres[o], config.language_prior) for o in config.favoured}
    yes_f = sum(pres[o] * out[o][0] for o in config.favoured)
    no_f = sum((1 - pres[o]) * out[o][1] for o in config.favoured)
    others = [o for o in config.objects if o not in config.favoured]
    pos, neg = sum(pres[o] for o in others), sum(1 - pres[o] for o in others)
    r = config.yes_rate / (1 - config.yes_rate)
    absent = ((yes_f + pos) / r - no_f) / neg  # all present others asked
    if absent <= 1:
        present = 1.0
    else:  # every absent other asked: ask fewer present ones
        absent, present = 1.0, ((no_f + neg) * r - yes_f) / pos
    if absent < 0 or present < 0:
        raise ValueError(
            f"yes_rate {config.yes_rate} is out of reach with language_prior {config.language_prior} "
            f"on favoured objects {config.favoured}"
        )
    out.update({o: (present, absent) for o in others})
    return {o: out[o] for o in config.objects}
