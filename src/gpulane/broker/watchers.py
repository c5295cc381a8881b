"""Who watches which job, and what each was last sent (so repeats are not sent again)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpulane.broker.identity import Identity
from gpulane.views import JobEvent

Watcher = Callable[[JobEvent], None]


class Watchers:
    """Watchers per job, each with the identity its views are rendered for."""

    def __init__(self) -> None:
        self.by_job: dict[int, set[Watcher]] = {}
        self._identity: dict[int, Identity] = {}
        self._sent: dict[tuple[int, int], dict[str, Any]] = {}

    def __bool__(self) -> bool:
        return bool(self.by_job)

    def add(self, job_id: int, watcher: Watcher, who: Identity) -> Callable[[], None]:
        """Start telling ``watcher`` about ``job_id``; returns the unsubscribe."""
        viewers = self.by_job.setdefault(job_id, set())
        viewers.add(watcher)
        self._identity[id(watcher)] = who

        def unsubscribe() -> None:
            viewers.discard(watcher)
            self._forget(job_id, watcher)
            if not viewers:
                self.by_job.pop(job_id, None)

        return unsubscribe

    def deliver(
        self, job_id: int, event_for: Callable[[Identity], JobEvent], finished: bool
    ) -> None:
        """Send each watcher of ``job_id`` its event, unless it equals the last one sent;
        a ``finished`` job's watchers are dropped afterwards."""
        for watcher in list(self.by_job.get(job_id, ())):
            who = self._identity.get(id(watcher))
            if who is None:
                continue
            event = event_for(who)
            # Skip repeats: elapsed times change every call, the rest rarely.
            signature: dict[str, Any] = {
                k: v for k, v in event["job"].items() if k not in ("elapsed", "remaining")
            }
            signature["holders"] = [(h["job"], h["user"]) for h in event["holders"]]
            key = (job_id, id(watcher))
            if self._sent.get(key) == signature:
                continue
            self._sent[key] = signature
            watcher(event)
        if finished:
            for watcher in list(self.by_job.pop(job_id, ())):
                self._forget(job_id, watcher)

    def _forget(self, job_id: int, watcher: Watcher) -> None:
        self._identity.pop(id(watcher), None)
        self._sent.pop((job_id, id(watcher)), None)
