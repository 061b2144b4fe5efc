"""A procedural toy world with documented priors, for training a tiny VLM that hallucinates for known reasons.

:mod:`.world` samples scenes (glyphs of a small object vocabulary, colours, counts), :mod:`.render` draws them,
:mod:`.texts` words the text tasks; :mod:`.stream` gives the training stream (multi-turn samples), and
:mod:`.splits` writes the evaluation splits in the POPE, CHAIR and VLind-Bench formats, so
``causalmm eval pope|chair|vlind`` runs on them. Everything is a pure function of a :class:`WorldConfig`
(seeded) and an index; :mod:`.worlds` names the worlds that ship with a trained model.
"""

from .render import render
from .scenes import Item, Scene, sample_scene
from .splits import chair_categories, eval_scenes, pope_questions, vlind_instances, write_splits
from .statistics import TrainStatistics, ask_probabilities, train_statistics
from .stream import TrainSample, Turn, train_sample, train_samples
from .texts import caption, split_words, vocabulary
from .world import SPECIAL_TOKENS, WorldConfig, vision_prior_world

__all__ = [
    "SPECIAL_TOKENS",
    "Item",
    "Scene",
    "TrainSample",
    "TrainStatistics",
    "Turn",
    "WorldConfig",
    "ask_probabilities",
    "caption",
    "chair_categories",
    "eval_scenes",
    "pope_questions",
    "render",
    "sample_scene",
    "split_words",
    "train_sample",
    "train_samples",
    "train_statistics",
    "vlind_instances",
    "vision_prior_world",
    "vocabulary",
    "write_splits",
]
