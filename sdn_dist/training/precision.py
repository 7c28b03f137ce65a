"""``autocast = auto``: bf16 where the device has bf16 units, fp32 elsewhere, decided once per run.

    from sdn_dist.training.precision import resolve_autocast
    used, why = resolve_autocast("auto", torch.device("cpu"))   # ("bf16", "avx512_bf16") on a Zen 4

On a CPU without bf16 instructions torch emulates bf16 and autocast makes the step much slower
(docs/performance.md), so ``auto`` asks the hardware: on CPUs the kernel's flags (``avx512_bf16``,
``amx_bf16``); on CUDA devices ``torch.cuda.is_bf16_supported()`` (Ampere and later).
"""

from __future__ import annotations

from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flags(cpuinfo: Path | None = None) -> list[str]:
    """The bf16 instruction-set flags of this CPU (Linux /proc/cpuinfo; elsewhere none known)."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break              # every core lists the same flags
    return [f for f in BF16_CPU_FLAGS if f in flags]


def resolve_autocast(asked: str, device: torch.device) -> tuple[str, str]:
    """``autocast`` as configured -> (``"bf16"`` or ``"off"``, why). Only ``auto`` asks the device."""
    if asked != "auto":
        return asked, "set explicitly"
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ("bf16", f"{torch.cuda.get_device_name(device)} supports bf16") if ok else \
            ("off", f"{torch.cuda.get_device_name(device)} has no bf16 units")
    flags = cpu_bf16_flags()
    if flags:
        return "bf16", "+".join(flags)
    return "off", "no avx512_bf16 / amx_bf16 on this CPU"
