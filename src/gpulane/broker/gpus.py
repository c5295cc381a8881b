"""The GPU inventory: NVML where GPUs exist, simulated GPUs where none do."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    uuid: str
    memory_total: int | None  # bytes
    memory_used: int | None
    utilization: int | None  # percent
    simulated: bool


class Inventory:
    """A fixed list of GPUs; ``read()`` gives fresh memory and utilization readings."""

    def __init__(self, count: int, memory: int, names: list[str], simulated: bool) -> None:
        self.count = count
        self.memory = memory  # bytes per GPU, used to split memory between slices
        self.names = names
        self.simulated = simulated
        self._nvml: Any = None

    @classmethod
    def simulate(cls, count: int, memory: int) -> Inventory:
        return cls(count, memory, [f"Simulated GPU {i}" for i in range(count)], simulated=True)

    @classmethod
    def from_nvml(cls) -> Inventory:
        """Read the machine's GPUs through NVML; raises RuntimeError where there are none."""
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as error:  # pynvml raises its own NVMLError subclasses
            raise RuntimeError(
                f"no NVIDIA GPU found through NVML ({error}); "
                "use --simulate-gpus N on a machine without GPUs"
            ) from error
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            raise RuntimeError("NVML reports no GPUs; use --simulate-gpus N to simulate some")
        names, memories = [], []
        for i in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            names.append(name.decode() if isinstance(name, bytes) else str(name))
            memories.append(int(pynvml.nvmlDeviceGetMemoryInfo(handle).total))
        inventory = cls(count, min(memories), names, simulated=False)
        inventory._nvml = pynvml
        return inventory

    def nvml(self) -> Any:
        """The initialised ``pynvml`` module where the GPUs are real, else None."""
        return self._nvml

    def read(self) -> list[GpuReading]:
        if self._nvml is None:
            return [
                GpuReading(i, self.names[i], f"SIM-{i}", self.memory, None, None, True)
                for i in range(self.count)
            ]
        nvml = self._nvml
        readings = []
        for i in range(self.count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                readings.append(
                    GpuReading(
                        i,
                        self.names[i],
                        uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                        int(memory.total),
                        int(memory.used),
                        int(util.gpu),
                        False,
                    )
                )
            except Exception as error:  # a GPU fallen off the bus must not take the broker down
                log.warning("NVML reading of GPU %d failed: %s", i, error)
                readings.append(GpuReading(i, self.names[i], "", None, None, None, False))
        return readings
