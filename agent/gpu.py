"""GPU telemetry and the check that a finished job's GPUs are free, through NVML where a GPU exists.

Where NVML cannot be loaded (no driver, no `nvidia-ml-py`, the test bed's fake GPUs) every call answers
"nothing known" rather than failing: telemetry is then absent, not wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSample:
    index: str
    name: str
    utilization: float
    memory_used_bytes: int
    memory_total_bytes: int


class Gpus:
    """Reads NVML once it is initialised; `available` is False where there is none."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # any failure means: no NVML here
            log.info("GPU telemetry unavailable (%s)", type(exc).__name__)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def samples(self) -> list[GpuSample]:
        if not self._nvml:
            return []
        nv = self._nvml
        out = []
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                util = nv.nvmlDeviceGetUtilizationRates(handle)
                name = nv.nvmlDeviceGetName(handle)
                out.append(GpuSample(str(i), name if isinstance(name, str) else name.decode(), util.gpu / 100.0,
                                     int(mem.used), int(mem.total)))
        except Exception as exc:
            log.warning("NVML query failed: %s", exc)
        return out

    def name(self) -> str:
        samples = self.samples()
        return samples[0].name if samples else ""

    def busy_pids(self, indices: list[str]) -> list[int]:
        """Processes that still hold any of these GPUs (empty where NVML is absent)."""
        if not self._nvml:
            return []
        nv = self._nvml
        pids: list[int] = []
        for index in indices:
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(int(index))
                pids += [p.pid for p in nv.nvmlDeviceGetComputeRunningProcesses(handle)]
            except Exception as exc:
                log.warning("NVML process query on GPU %s failed: %s", index, exc)
        return pids
