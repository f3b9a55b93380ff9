"""The shard builder's one expected failure: a bad argument or destination, said in one sentence."""
from __future__ import annotations

__all__ = ["BuildError"]


class BuildError(ValueError):
    """A problem with the arguments or the destination; the message is one sentence for the user."""
