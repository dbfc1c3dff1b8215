"""The one exception family of repfuse.

Every error a user can cause (a file that does not load, a model that does not trace, an option
that makes no sense) is a :class:`RepfuseError` whose message says what to do. The CLI prints it
as one line and exits with :attr:`RepfuseError.exit_code`.
"""

from __future__ import annotations


class RepfuseError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = 2


class LoadError(RepfuseError):
    """A model or input file could not be loaded."""


class UnsafeLoadError(LoadError):
    """Loading would unpickle arbitrary code and the user did not say they trust the file."""


class CaptureError(RepfuseError):
    """The model could not be traced into a torch.fx graph."""


class VerificationError(RepfuseError):
    """Reference and candidate could not be compared (not: they differ)."""


class GraphInvariantError(RuntimeError):
    """A rewrite left the graph inconsistent: a bug in repfuse, never the user's fault."""


class RepfuseWarning(UserWarning):
    """Something the user should know about a conversion that still goes ahead."""


class PassBugWarning(RepfuseWarning):
    """A pass raised while examining a candidate: a bug in repfuse. The candidate was left as
    it was (declined), the rest of the model was still fused."""
