"""The broker core's settings: the typed values ``broker/app.py`` builds from its options."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpulane.broker import policy
from gpulane.broker.devices import DeviceSettings
from gpulane.broker.memory_watch import WatchSettings
from gpulane.broker.mps import MpsSettings


@dataclass(frozen=True)
class BrokerSettings:
    policy: policy.PolicyConfig = field(default_factory=policy.PolicyConfig)
    lease_ttl: float = 10.0  # seconds without heartbeat before a lease is presumed dead
    kill_grace: float = 10.0  # seconds between SIGTERM and SIGKILL of a revoked job
    max_queued_per_user: int = 1000
    publish_interval: float = 0.1  # at most this often, queue positions are pushed again
    status_page: int = 100  # queue entries in a status answer when the client names no limit
    max_status_page: int = 1000  # the most queue entries one status answer carries
    # The server's limits (broker/connections.py): per uid, per identity, per connection.
    max_connections_per_user: int = 128  # 0: no cap; root is never capped
    max_requests_per_second: int = 20  # per identity, past a burst; 0: no limit
    request_burst: int = 100
    idle_timeout: float = 60.0  # seconds a connection may wait between requests
    write_timeout: float = 30.0  # seconds an answer may go unread before its connection closes
    max_submits_per_minute: int = 60  # per user, over a sliding minute; 0: no cap
    retention: float = 30 * 86400.0  # seconds an ended job is kept (usage totals stay)
    max_ended_per_user: int = 10_000  # ended jobs kept per user, oldest pruned first; 0: no cap
    prune_interval: float = 60.0  # seconds between prunes of ended jobs
    # Where users' groups are read (groups.py): "hub" (the hub's, where the broker is a hub
    # service; else Unix groups) or "unix" (always the system's).
    group_source: str = "hub"
    admin_users: frozenset[str] = frozenset()  # admins by name, by token or socket (access.py)
    prune_batch: int = 500  # rows deleted at most per prune step, so one never holds the loop
    # GPU device files open only to holders (broker/devices.py); off unless app.py enforces.
    devices: DeviceSettings = field(default_factory=DeviceSettings)
    # The GPU memory watchdog (broker/memory_watch.py): runs where there are readings.
    memory_watch: WatchSettings = field(default_factory=WatchSettings)
    # CUDA MPS daemons with pinned memory limits (broker/mps.py); off unless app.py plans it.
    mps: MpsSettings = field(default_factory=MpsSettings)
