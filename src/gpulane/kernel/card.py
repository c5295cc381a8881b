"""The queue card: one output in the cell, updated in place while the job waits and runs.

Every rendering carries text/plain beside text/html, so the card reads well in
JupyterLab, classic Notebook, VS Code and in nbconvert/nbclient output.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from typing import Any

from gpulane.display import describe_eta, describe_holders, final_words
from gpulane.jobs import format_bytes, format_duration
from gpulane.scheduler.base import JobUpdate, JobView

_COLOURS = {"queued": "#b26a00", "running": "#1b6e20", "completed": "#1b6e20"}


class CardView:
    """A snapshot of the card; IPython renders it through ``__repr__`` and ``_repr_html_``."""

    def __init__(self, title: str, lines: list[str], state: str) -> None:
        self.title, self.lines, self.state = title, lines, state

    def __repr__(self) -> str:
        return "\n".join([f"[gpulane] {self.title}", *(f"  {line}" for line in self.lines)])

    def _repr_html_(self) -> str:
        colour = _COLOURS.get(self.state, "#b00020")
        items = "".join(f"<li>{html.escape(line)}</li>" for line in self.lines)
        return (
            f'<div class="gpulane-card" data-state="{html.escape(self.state)}" '
            f'style="border-left:4px solid {colour};padding:2px 8px;font-family:sans-serif;font-size:90%">'
            f"<b>gpulane</b> · {html.escape(self.title)}<ul style='margin:2px 0'>{items}</ul></div>"
        )


def render(update: JobUpdate) -> CardView:
    job, now = update.job, update.now or time.time()
    head = f"job {job['id']} ({job.get('name', 'job')})"
    state = update.state
    if state == "queued":
        lines = [
            f"position {job.get('position', '?')} in the queue · {describe_eta(job.get('eta'), now)}",
        ]
        holders = update.holders or []
        lines += [describe_holders([h]) for h in holders]
        if not holders:
            lines.append("no one holds a GPU")
        if job.get("reason_text"):
            lines.append(f"why: {job['reason_text']}")
        return CardView(f"{head} waits for a GPU", lines, state)
    if state == "running":
        if job.get("ending"):
            return CardView(f"{head} is being stopped", [str(job.get("message", ""))], "ending")
        gpus = ",".join(map(str, job.get("assigned_gpus") or []))
        share = f"{job['slices']} slice(s) of GPU {gpus}" if job.get("slices") else f"GPU {gpus}"
        if job.get("gpu_mem") is not None:
            share = f"{format_bytes(job.get('gpu_mem'))} of GPU {gpus}"
        lines = [f"time limit {format_duration(job.get('time_limit'))}"]
        if job.get("gpu_mem_warning"):  # the broker's watchdog: over its GPU memory
            lines.append(f"warning: {job['gpu_mem_warning']}; it ends soon unless it frees some")
        if job.get("pod"):  # Kubernetes: the worker pod's own phase, or why it is refused
            lines.append(f"worker pod: {job['pod']}")
        return CardView(f"{head} runs on {share}", lines, state)
    return render_final(job)


def render_final(job: JobView, note: str = "") -> CardView:
    head = f"job {job['id']} ({job.get('name', 'job')})"
    gpus = ",".join(map(str, job.get("assigned_gpus") or []))
    lines = [final_words(job) + (f" on GPU {gpus}" if gpus else "")]
    if note:
        lines.append(note)
    return CardView(head, lines, job["state"])


def message_card(title: str, lines: list[str], state: str = "info") -> CardView:
    return CardView(title, lines, state)


class Card:
    """A display handle that shows the latest CardView."""

    def __init__(
        self, first: CardView, notes: Callable[[JobUpdate], list[str]] | None = None
    ) -> None:
        from IPython.display import display

        self.handle: Any = display(first, display_id=True)  # type: ignore[no-untyped-call]
        self.last = repr(first)
        self.notes = notes  # the kernel's own lines for a queued job (why not in the session)

    def show(self, view: CardView) -> None:
        if repr(view) == self.last or self.handle is None:
            return
        self.last = repr(view)
        self.handle.update(view)

    def on_update(self, update: JobUpdate) -> None:
        view = render(update)
        if self.notes is not None and update.state == "queued":
            view.lines += self.notes(update)
        self.show(view)
