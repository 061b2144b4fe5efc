"""Where the engine may act on a model, one small layer between the methods and the model's modules:

- ``tags.py``       the :class:`Site` tag a module carries, the attention implementation names
- ``find.py``       which modules are sites (the tower's and the LLM's attention, MLPs and decoder layers), tagged
                    and hooked once per model
- ``state.py``      the :class:`Intervention` one forward reads: rows, draws, per-row state
- ``scores.py``     the attention arithmetic the hooks share
- ``attention.py``  the registered attention function: ``do(A = a~)`` and the edits of the scores
- ``edits.py``      the baselines' attention edits (PAI, VAF, SID, AvisC/OPERA's watch)
- ``mlp.py``        the MLP-output and decoder-layer-output hooks (MemVR's read, steering vectors)

A method asks for a site through the state; it never touches a module.
"""

from . import attention  # noqa: F401  (registers the attention hook with transformers)
from .state import Draws, Intervention, SiteRule, active, intervene
from .tags import BASES, SITE_ATTR, Site, attention_name

__all__ = ["BASES", "SITE_ATTR", "Draws", "Intervention", "Site", "SiteRule", "active", "attention_name", "intervene"]
