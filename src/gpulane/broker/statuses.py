"""The HTTP status of each kind of refusal: the one place the broker's answers meet HTTP.

Both of the broker's front doors, the socket API (``server.py``) and the
dashboard (``dashboard.py``), answer refusals through this table.
"""

from __future__ import annotations

from gpulane.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    LimitReached,
    NotAuthenticated,
    NotFound,
    Refused,
    StateFolderFull,
    TooLarge,
    Unavailable,
)

STATUS_OF: dict[type[Refused], int] = {
    InvalidRequest: 400,
    NotAuthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    LimitReached: 429,
    Unavailable: 503,
    StateFolderFull: 503,
}


def status_of(error: Refused) -> int:
    """The status for ``error``: its own kind's, else the nearest base's; 400 for a bare refusal."""
    for kind in type(error).__mro__:
        if kind in STATUS_OF:
            return STATUS_OF[kind]
    return 400
