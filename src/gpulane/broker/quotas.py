"""What one user may put into the store: submissions per minute, ended jobs kept.

Both bound what a user can make the broker write (issue: the database grew
without bound). Usage totals live in their own table and survive pruning.
"""

from __future__ import annotations

import collections
import logging

from gpulane.broker.store import Store
from gpulane.errors import LimitReached

log = logging.getLogger("gpulane.broker")


class SubmitRate:
    """At most ``per_minute`` accepted submissions per user in any sliding minute (0: no cap)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._recent: dict[str, collections.deque[float]] = {}  # users active this minute

    def check(self, user: str, now: float) -> None:
        """Refuse a user's submission past their allowance for the last minute."""
        recent = self._recent.get(user)
        if not self.per_minute or recent is None:
            return
        while recent and recent[0] <= now - 60:
            recent.popleft()
        if not recent:
            del self._recent[user]
        elif len(recent) >= self.per_minute:
            wait = max(1, round(recent[0] + 60 - now))
            raise LimitReached(
                f"{user} submitted {len(recent)} jobs in the last minute, the most allowed; "
                f"try again in {wait} s"
            )

    def accepted(self, user: str, now: float) -> None:
        if self.per_minute:
            self._recent.setdefault(user, collections.deque()).append(now)


class Pruner:
    """Deletes ended jobs past the retention or past a user's cap, one small batch a step."""

    def __init__(self, store: Store, retention: float, max_ended_per_user: int, batch: int) -> None:
        self.store = store
        self.retention = retention
        self.max_ended_per_user = max_ended_per_user
        self.batch = batch
        self.ended: dict[str, int] = {}  # ended jobs the store keeps, per user

    def load(self) -> None:
        self.ended = self.store.finished_per_user()

    def job_ended(self, user: str) -> None:
        self.ended[user] = self.ended.get(user, 0) + 1

    def step(self, now: float) -> bool:
        """One batch; True if a backlog is left (the caller runs the next step soon)."""
        budget = self.batch
        for user in self.store.prune_ended_before(now - self.retention, budget):
            self.ended[user] = self.ended.get(user, 1) - 1
            budget -= 1
        cap = self.max_ended_per_user
        for user, kept in list(self.ended.items()):
            if cap and kept > cap and budget > 0:
                gone = self.store.prune_oldest_of(user, min(kept - cap, budget))
                self.ended[user] = kept - gone
                budget -= gone
            if self.ended[user] <= 0:
                del self.ended[user]
        if budget < self.batch:
            log.info("pruned %d ended jobs", self.batch - budget)
        return budget <= 0
