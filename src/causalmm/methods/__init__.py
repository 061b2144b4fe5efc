"""Decoding methods, one file each, found through one registry (:data:`METHODS`).

Adding a branch-style method is one new file here (a :class:`Method` subclass decorated with
:func:`register`) plus its import below and its tests.
"""

# each import registers its method, in the order `causalmm methods` lists them: the headline methods first,
# then the baselines (branch methods, then single-pass edits, then layer-contrast methods, then searches)
from . import regular, causalmm, vcd  # noqa: E402, F401, I001
from . import icd, m3id, pai, avisc, sid, ritual, agla  # noqa: E402, F401, I001
from . import vista, vti, vaf, memvr, only  # noqa: E402, F401, I001
from . import dola, deco  # noqa: E402, F401, I001
from . import opera  # noqa: E402, F401, I001
from .base import Branch, Directions, FactualEdit, ImageMemory, Method, Param, Range, ScoreScale, SideLogits, Steering
from .registry import METHODS, get_method, method_names, register

# an import above can register another's method first (causalmm's imports the engine, whose OPERA search imports
# opera's): put them in the order of the imports, the order `causalmm methods` and the docs list them
for _name in ("regular", "causalmm", "vcd", "icd", "m3id", "pai", "avisc", "sid", "ritual", "agla", "vista", "vti",
              "vaf", "memvr", "only", "dola", "deco", "opera"):  # fmt: skip
    METHODS[_name] = METHODS.pop(_name)

__all__ = [
    "METHODS", "Branch", "Directions", "FactualEdit", "ImageMemory", "Method", "Param", "Range", "ScoreScale",
    "SideLogits", "Steering", "branches_for", "get_method", "method_names", "register",
]  # fmt: skip


def branches_for(config) -> tuple[Branch, ...]:
    """The counterfactual branches ``config`` runs beside the factual one."""
    return get_method(config.method).branches(config)
