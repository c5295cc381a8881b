"""jupyterhub-idle-culler as gpulane runs it: a managed service that stops when told to.

JupyterHub stops a managed service with SIGINT and waits ``interrupt_timeout`` (30 s)
before SIGTERM. The culler relies on Python's KeyboardInterrupt for SIGINT, which
Python does not install where SIGINT was already ignored when the culler started (a
hub started in the background by a non-interactive shell inherits SIG_IGN, and so do
its services): then every hub stop waited the whole 30 s. Here SIGINT and
SIGTERM end the culler at once, whatever the hub inherited.

    python -m gpulane.hub.culler --timeout=3600    # the culler's own options
"""

from __future__ import annotations

import signal
from types import FrameType


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit)
    from jupyterhub_idle_culler import main as culler_main  # type: ignore[import-untyped]

    culler_main()


if __name__ == "__main__":
    main()
