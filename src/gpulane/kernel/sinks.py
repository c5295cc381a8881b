"""Where a GPU cell's output lands in the notebook."""

from __future__ import annotations

import sys
import threading
from typing import Any

from gpulane.kernel.protocol import CellError, CellOutput, CellWarning, ClearOutput, Display, Result


def _shell() -> Any:
    from IPython import get_ipython

    return get_ipython()


class ForegroundSink:
    """Output of a cell the user is waiting on: straight into that cell, as it is written."""

    def __init__(self) -> None:
        self.error: CellError | None = None
        self.warnings: list[str] = []

    def stream(self, name: str, text: str) -> None:
        # Into the kernel's own streams, unflushed: ipykernel batches the text into messages as
        # for a plain cell, and sends it before the next display (publish flushes streams first).
        target = sys.stdout if name == "stdout" else sys.stderr
        target.write(text)

    def flush(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()

    def message(self, message: CellOutput) -> None:
        publisher = _shell().display_pub
        match message:
            case Display():
                publisher.publish(
                    data=message.data,
                    metadata=message.metadata,
                    transient=message.transient or None,
                    update=message.update,
                )
            case Result():
                publisher.publish(data=message.data, metadata=message.metadata)
            case ClearOutput():
                publisher.clear_output(wait=message.wait)
            case CellError():
                self.error = message
            case CellWarning():
                self.warn(message.text)

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
        self.displays: list[Display | Result] = []
        self._lock = threading.Lock()
        self.handle: Any = display({"text/plain": ""}, raw=True, display_id=True)  # type: ignore[no-untyped-call]

    def stream(self, name: str, text: str) -> None:
        with self._lock:
            self.text += text
            current = self.text
        self.handle.update({"text/plain": current}, raw=True)

    def flush(self) -> None:
        pass  # its text is already in its display

    def message(self, message: CellOutput) -> None:
        match message:
            case Display() | Result():
                self.displays.append(message)
            case CellError():
                self.error = message
            case CellWarning():
                self.warnings.append(message.text)
                self.stream("stderr", f"gpulane: {message.text}\n")
            case ClearOutput():
                pass  # its text output is one line updated in place: nothing to clear

    def replay(self) -> None:
        """Show the kept rich displays in the cell that asks for them."""
        publisher = _shell().display_pub
        for message in self.displays:
            publisher.publish(data=message.data, metadata=message.metadata)
        self.displays.clear()
