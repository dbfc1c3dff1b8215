"""The one exception family of repfuse.

Every error a user can cause (a file that does not load, a model that does not trace, an option
that makes no sense, an export that fails) is a :class:`RepfuseError` whose message says what to
do. The CLI prints it as one line and exits with :attr:`RepfuseError.exit_code` (2).

The zoo's errors also derive from the built-in exception that callers caught before they joined
this family (``KeyError`` for an unknown name, ``ValueError`` for a structure that does not fit).
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: what a one-line error says of an exception."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


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


class ExportError(RepfuseError):
    """A fused model could not be exported in the asked format."""


class UnknownModelError(RepfuseError, KeyError):
    """No zoo model has the asked name."""

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return Exception.__str__(self)


class ModelStructureError(RepfuseError, ValueError):
    """A model, state dict or registration does not have the structure asked for: a deploy
    form that does not exist, weights that do not fit it, a name registered twice."""


class GraphInvariantError(RuntimeError):
    """A rewrite left the graph inconsistent: a bug in repfuse, never the user's fault."""


class RepfuseWarning(UserWarning):
    """Something the user should know about a conversion that still goes ahead."""


class PassBugWarning(RepfuseWarning):
    """A pass raised while examining a candidate: a bug in repfuse. The candidate was left as
    it was (declined), the rest of the model was still fused."""
