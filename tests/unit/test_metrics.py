"""The broker's Prometheus metrics: values as a scrape sees them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from gpulane.broker.core import Broker
from gpulane.broker.gpus import Inventory
from gpulane.broker.identity import Identity
from gpulane.broker.metrics import CONTENT_TYPE, BrokerMetrics
from gpulane.broker.policy import PolicyConfig
from gpulane.broker.settings import BrokerSettings
from gpulane.broker.store import Store
from gpulane.jobs import Request


def samples(data: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    result = {}
    for family in text_string_to_metric_families(data.decode()):
        for sample in family.samples:
            result[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return result


def value(data: bytes, name: str, **labels: str) -> float:
    return samples(data)[(name, tuple(sorted(labels.items())))]


def test_fresh_metrics_are_zero() -> None:
    data = BrokerMetrics().render()
    for name in ("submits", "grants", "cancels", "timeouts"):
        assert value(data, f"gpulane_{name}_total") == 0.0
    assert value(data, "gpulane_queue_length") == 0.0
    assert value(data, "gpulane_wait_seconds_count") == 0.0
    assert "text/plain" in CONTENT_TYPE


def test_event_counters() -> None:
    metrics = BrokerMetrics()
    for _ in range(3):
        metrics.submitted()
    metrics.cancelled()
    metrics.timed_out()
    metrics.timed_out()
    data = metrics.render()
    assert value(data, "gpulane_submits_total") == 3.0
    assert value(data, "gpulane_cancels_total") == 1.0
    assert value(data, "gpulane_timeouts_total") == 2.0


def test_wait_lands_in_its_bucket() -> None:
    metrics = BrokerMetrics()
    metrics.granted(3.0)  # between the 1 s and 5 s bounds
    data = metrics.render()
    assert value(data, "gpulane_grants_total") == 1.0
    assert value(data, "gpulane_wait_seconds_bucket", le="1.0") == 0.0
    assert value(data, "gpulane_wait_seconds_bucket", le="5.0") == 1.0
    assert value(data, "gpulane_wait_seconds_bucket", le="3600.0") == 1.0
    assert value(data, "gpulane_wait_seconds_bucket", le="+Inf") == 1.0
    assert value(data, "gpulane_wait_seconds_sum") == 3.0
    metrics.granted(7200.0)
    data = metrics.render()
    assert value(data, "gpulane_wait_seconds_bucket", le="3600.0") == 1.0
    assert value(data, "gpulane_wait_seconds_bucket", le="+Inf") == 2.0


def test_gpu_seconds_per_user() -> None:
    metrics = BrokerMetrics()
    metrics.used("ann", 10.0)
    metrics.used("ann", 2.5)
    metrics.used("bob", 4.0)
    metrics.used("cid", 0.0)  # a job that never ran adds no label
    data = metrics.render()
    assert value(data, "gpulane_gpu_seconds_total", user="ann") == 12.5
    assert value(data, "gpulane_gpu_seconds_total", user="bob") == 4.0
    assert ("gpulane_gpu_seconds_total", (("user", "cid"),)) not in samples(data)


def test_gauges_and_own_registry() -> None:
    one, two = BrokerMetrics(), BrokerMetrics()  # no clash: each has its own registry
    one.set_state(queue_length=4, running_jobs=2, slices_in_use=3)
    data = one.render()
    assert value(data, "gpulane_queue_length") == 4.0
    assert value(data, "gpulane_running_jobs") == 2.0
    assert value(data, "gpulane_gpu_slices_in_use") == 3.0
    assert value(two.render(), "gpulane_queue_length") == 0.0
    assert REGISTRY.get_sample_value("gpulane_submits_total") is None


def test_broker_feeds_its_metrics(tmp_path: Path) -> None:
    """A real broker (simulated GPUs, a fake clock): submit, grant, wait, finish, cancel."""
    clock = [1_000_000.0]

    async def scenario() -> None:
        settings = BrokerSettings(policy=PolicyConfig(slices_per_gpu=2))
        broker = Broker(
            settings, Inventory.simulate(1, 2**30), Store(tmp_path / "b.db"), lambda: clock[0]
        )
        broker.start()
        try:
            ann = Identity(uid=1000, user="ann", groups=frozenset(), pid=None)
            bob = Identity(uid=1001, user="bob", groups=frozenset(), pid=None)
            first = broker.submit(ann, Request(gpus=1, command=("true",)))
            second = broker.submit(bob, Request(gpus=1, command=("true",)))
            data = broker.render_metrics()
            assert value(data, "gpulane_submits_total") == 2.0
            assert value(data, "gpulane_grants_total") == 1.0
            assert value(data, "gpulane_running_jobs") == 1.0
            assert value(data, "gpulane_queue_length") == 1.0
            assert value(data, "gpulane_gpu_slices_in_use") == 2.0
            clock[0] += 30.0
            broker.finish(ann, first["id"], 0)  # bob is granted after a 30 s wait
            clock[0] += 10.0
            broker.cancel(bob, second["id"])
            data = broker.render_metrics()
            assert value(data, "gpulane_grants_total") == 2.0
            assert value(data, "gpulane_wait_seconds_bucket", le="15.0") == 1.0
            assert value(data, "gpulane_wait_seconds_bucket", le="60.0") == 2.0
            assert value(data, "gpulane_cancels_total") == 1.0
            assert value(data, "gpulane_gpu_seconds_total", user="ann") == 30.0
            assert value(data, "gpulane_running_jobs") == 1.0  # bob's job is being stopped
            report = broker.usage_report()
            assert report["gpu_count"] == 1
            assert report["today"]["ann"] == 30.0
            assert len(report["last_hour"]) == 60
        finally:
            broker.stop()

    asyncio.run(scenario())
