"""Every error gpulane raises on purpose, under one root: :class:`GpulaneError`.

Each message is one line, worded for the person who caused it. The broker's
refusals (:class:`Refused` and its kinds) say *what* went wrong; the HTTP
server alone maps each kind to a status code, so the state machine knows
nothing of HTTP.
"""

from __future__ import annotations


class GpulaneError(Exception):
    """A failure or refusal worded for the user in one line."""


class OptionError(GpulaneError, ValueError):
    """A user-supplied option is malformed; the message names it and the accepted forms."""


class ConfigError(GpulaneError, ValueError):
    """A configuration file or setting is malformed; the message says where and how."""


class SchedulerError(GpulaneError):
    """A back end refused or failed a request."""


class SchedulerUnavailable(SchedulerError):
    """The back end cannot be reached at all."""


class Refused(SchedulerError):
    """The broker will not do what was asked. Subclasses say why; the server picks the status."""


class InvalidRequest(Refused):
    """The request is malformed or can never be met here."""


class NotAuthenticated(Refused):
    """The credentials offered (a hub token) do not name anyone."""


class Forbidden(Refused):
    """The caller is known but may not do this."""


class NotFound(Refused):
    """No such job (or none the caller may see)."""


class Conflict(Refused):
    """The job is not in a state that allows this."""


class LimitReached(Refused):
    """A per-user bound is reached (queued jobs, request rate)."""


class TooLarge(Refused):
    """The request body is over the bound."""


class Unavailable(Refused):
    """The broker cannot do this now (its state folder is full); the same request may work later."""


class StateFolderFull(Unavailable):
    """A write to the broker's state folder found no room: nothing of it was saved."""
