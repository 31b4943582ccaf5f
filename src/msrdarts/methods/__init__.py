"""Search methods: the :class:`Method` interface, one file per method, and what they share
(``derive``: scores to genotype; ``stable_rank``: the supernet's stable-rank tables; ``space``:
random sampling of a search space). Importing this package registers the built-in methods."""

from .base import Method, SearchContext, get_method, list_methods, register_method
from . import msr  # noqa: F401, I001  (registers MSR-DARTS first: the order of --method's choices)
from . import darts  # noqa: F401
from . import pcdarts  # noqa: F401
from . import pdarts  # noqa: F401

__all__ = ["Method", "SearchContext", "get_method", "list_methods", "register_method"]
