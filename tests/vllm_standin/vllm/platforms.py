"""Stand-in for `vllm.platforms` (see ../README.md): the platform vLLM runs on, the CPU here."""

from __future__ import annotations


class _CpuPlatform:
    device_type = "cpu"

    def is_cpu(self) -> bool:
        return True


current_platform = _CpuPlatform()
