"""The broker's state machine in this process, on a virtual clock: no root, socket or child.

``broker_house`` gives a factory: ``house = broker_house(gpus=1, ...)`` builds a
:class:`~gpulane.broker.core.Broker` on simulated GPUs and a real SQLite store in
``tmp_path``, started inside a :class:`VirtualTimeLoop` whose clock is also the broker's.
``house.call(house.broker.submit, alice, Request())`` runs a request as the server would;
``house.advance(seconds)`` lets time pass (time limits, grace periods, the lease sweep);
``house.restart()`` stops the broker and starts a new one on the same store.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpulane.broker.core import Broker
from gpulane.broker.gpus import Inventory
from gpulane.broker.identity import Identity
from gpulane.broker.settings import BrokerSettings
from gpulane.broker.store import Store
from tests.support.virtual_time import VirtualTimeLoop

GIB = 1024**3


def person(user: str, *groups: str, pid: int | None = None, admin: bool = False) -> Identity:
    """A user as the broker sees one. ``admin`` is stated, so the specs read the same as root."""
    return Identity(uid=os.getuid(), user=user, groups=frozenset(groups), pid=pid, admin=admin)


class BrokerHouse:
    """One broker, its store and its loop; see the module's docstring."""

    def __init__(self, folder: Path, settings: BrokerSettings, gpus: int, memory: int) -> None:
        self.loop = VirtualTimeLoop()
        self.settings, self.gpus, self.memory = settings, gpus, memory
        self.db = folder / "state" / "broker.sqlite3"
        self.broker = self._start()

    def _start(self) -> Broker:
        broker = Broker(
            self.settings,
            Inventory.simulate(self.gpus, self.memory),
            Store(self.db),
            clock=self.loop.time,
        )
        self.call(broker.start)
        return broker

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.loop.call(fn, *args)

    def advance(self, seconds: float) -> None:
        self.loop.advance(seconds)

    def now(self) -> float:
        return self.loop.time()

    def state(self, who: Identity, job_id: int) -> str:
        return str(self.call(self.broker.lookup, who, job_id)["state"])

    def shut(self) -> None:
        """Stop the broker as its process would on exit; its timers and sweeper end."""
        self.call(self.broker.stop)
        self.loop.run_until_complete(asyncio.sleep(0))  # let the cancelled sweeper finish

    def restart(self, down_for: float = 0.0) -> Broker:
        """Stop this broker, let ``down_for`` seconds pass, start a new one on the same store."""
        self.shut()
        self.advance(down_for)
        self.broker = self._start()
        return self.broker

    def close(self) -> None:
        self.shut()
        self.loop.close()


@pytest.fixture
def broker_house(tmp_path: Path) -> Iterator[Callable[..., BrokerHouse]]:
    houses: list[BrokerHouse] = []

    def factory(gpus: int = 1, memory: int = 16 * GIB, **settings: Any) -> BrokerHouse:
        # Clients here send no heartbeats unless a spec says so: a day's lease keeps other
        # timers' specs from being cut short; the lease specs set their own.
        settings.setdefault("lease_ttl", 24 * 3600.0)
        house = BrokerHouse(
            tmp_path / f"house-{len(houses)}", BrokerSettings(**settings), gpus, memory
        )
        houses.append(house)
        return house

    yield factory
    for house in houses:
        house.close()
