"""Where a GPU cell's output lands in the notebook."""

from __future__ import annotations

import sys
import threading
from typing import Any


def _shell() -> Any:
    from IPython import get_ipython

    return get_ipython()


class ForegroundSink:
    """Output of a cell the user is waiting on: straight into that cell, as it is written."""

    def __init__(self) -> None:
        self.error: dict[str, Any] | None = None
        self.warnings: list[str] = []

    def stream(self, name: str, text: str) -> None:
        target = sys.stdout if name == "stdout" else sys.stderr
        target.write(text)
        target.flush()

    def message(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        publisher = _shell().display_pub
        if op in ("display", "result"):
            publisher.publish(
                data=message["data"],
                metadata=message.get("metadata") or {},
                transient=message.get("transient") or None,
                update=bool(message.get("update")),
            )
        elif op == "clear_output":
            publisher.clear_output(wait=bool(message.get("wait")))
        elif op == "error":
            self.error = message
        elif op == "warning":
            self.warn(str(message.get("text")))

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        sys.stderr.write(f"gpulane: {text}\n")
        sys.stderr.flush()


class BackgroundSink(ForegroundSink):
    """Output of a ``--bg`` cell: its cell has returned, so text goes to an output updated in place,
    and rich displays are kept for ``%gpu wait`` / ``%gpu result`` to show."""

    def __init__(self) -> None:
        super().__init__()
        from IPython.display import display

        self.text = ""
        self.displays: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.handle: Any = display({"text/plain": ""}, raw=True, display_id=True)  # type: ignore[no-untyped-call]

    def stream(self, name: str, text: str) -> None:
        with self._lock:
            self.text += text
            current = self.text
        self.handle.update({"text/plain": current}, raw=True)

    def message(self, message: dict[str, Any]) -> None:
        if message.get("op") in ("display", "result"):
            self.displays.append(message)
        elif message.get("op") == "error":
            self.error = message
        elif message.get("op") == "warning":
            self.warnings.append(str(message.get("text")))
            self.stream("stderr", f"gpulane: {message.get('text')}\n")

    def replay(self) -> None:
        """Show the kept rich displays in the cell that asks for them."""
        publisher = _shell().display_pub
        for message in self.displays:
            publisher.publish(data=message["data"], metadata=message.get("metadata") or {})
        self.displays.clear()
