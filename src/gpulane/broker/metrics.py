"""Prometheus metrics of one broker, in a registry of their own (not the process-global one).

The broker calls the event methods as things happen; the gauges are set from
its state just before each scrape (``set_state``, then ``render``).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Interactive waits: a tenth of a second (a free GPU) up to an hour (a busy day).
WAIT_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)


class BrokerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue_length = Gauge("gpulane_queue_length", "Jobs waiting for a GPU.", registry=r)
        self.running_jobs = Gauge("gpulane_running_jobs", "Jobs holding GPUs.", registry=r)
        self.slices_in_use = Gauge(
            "gpulane_gpu_slices_in_use", "GPU slices held by running jobs.", registry=r
        )
        self.wait_seconds = Histogram(
            "gpulane_wait_seconds",
            "Seconds from a job's submission to its grant.",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.gpu_seconds = Counter(
            "gpulane_gpu_seconds",
            "GPU-equivalent seconds used by finished jobs, per user.",
            ["user"],
            registry=r,
        )
        self.submits = Counter("gpulane_submits", "Jobs submitted.", registry=r)
        self.grants = Counter("gpulane_grants", "Jobs granted GPUs.", registry=r)
        self.cancels = Counter("gpulane_cancels", "Cancel requests.", registry=r)
        self.timeouts = Counter(
            "gpulane_timeouts", "Jobs that reached their time limit.", registry=r
        )

    # ------------------------------------------------------------- events

    def submitted(self) -> None:
        self.submits.inc()

    def granted(self, wait: float) -> None:
        self.grants.inc()
        self.wait_seconds.observe(max(0.0, wait))

    def cancelled(self) -> None:
        self.cancels.inc()

    def timed_out(self) -> None:
        self.timeouts.inc()

    def used(self, user: str, gpu_seconds: float) -> None:
        """Count the GPU time of a job that ended."""
        if gpu_seconds > 0:
            self.gpu_seconds.labels(user=user).inc(gpu_seconds)

    # ------------------------------------------------------------- scrape

    def set_state(self, queue_length: int, running_jobs: int, slices_in_use: int) -> None:
        self.queue_length.set(queue_length)
        self.running_jobs.set(running_jobs)
        self.slices_in_use.set(slices_in_use)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry (serve it with ``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
