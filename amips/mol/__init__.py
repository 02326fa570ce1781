"""Mixture-of-Logits (MoL) learned similarity: the head, its item cache, and top-k retrieval.

``MoL`` / ``DotProduct`` are torch modules to put on top of query and item towers;
``item_cache`` stores what is query-independent; ``topk`` retrieves with one of five methods
(``exact``, ``per_embedding``, ``averaged``, ``combined``, ``bound``). See docs/mol.md.
"""

from .similarity import DotProduct, ItemCache, MoL, QueryParts
from .topk import METHODS, topk

__all__ = ["MoL", "DotProduct", "ItemCache", "QueryParts", "topk", "METHODS"]

# The recommender trained on feedback (issue 10, part 4).
from .data import Interactions, generate_ratings, load_interactions  # noqa: E402
from .recommender import Recommender, load  # noqa: E402

__all__ += ["load", "Recommender", "Interactions", "load_interactions", "generate_ratings"]
