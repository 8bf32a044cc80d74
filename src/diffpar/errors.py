"""Errors diffpar raises. Every message says what is wrong, why, and what to do."""


class DiffparError(ValueError):
    """A configuration or input diffpar cannot run with. Raised on every rank before any collective."""


class RankMismatchError(DiffparError):
    """Ranks were handed different configurations, models or inputs."""


class UnsupportedError(DiffparError):
    """The model, module or installed release cannot do what was asked."""
