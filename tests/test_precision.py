"""autocast = auto: bf16 where the device has bf16 units, decided once (sdn_dist/training/precision.py).

    pytest tests/test_precision.py
"""

import pytest
import torch

from sdn_dist.config import load_config
from sdn_dist.model.losses import stages
from sdn_dist.training import loop, precision

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\nprocessor\t: 1\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
SAPPHIRE = "flags\t\t: fpu avx512f amx_bf16 amx_tile avx512_bf16\n"


@pytest.mark.parametrize("text, used, why", [(ZEN4, "bf16", "avx512_bf16"), (SKYLAKE, "off", "no avx512_bf16"),
                                             (SAPPHIRE, "bf16", "amx_bf16+avx512_bf16"), ("", "off", "no avx512_bf16")])
def test_auto_reads_the_cpus_bf16_flags(tmp_path, monkeypatch, text, used, why):
    (tmp_path / "cpuinfo").write_text(text)
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "cpuinfo")
    got, reason = precision.resolve_autocast("auto", torch.device("cpu"))
    assert got == used and reason.startswith(why)
    # an explicit setting is never second-guessed
    assert precision.resolve_autocast("off", torch.device("cpu"))[0] == "off"
    assert precision.resolve_autocast("bf16", torch.device("cpu"))[0] == "bf16"


def test_auto_is_accepted_and_resolved_before_the_step(tmp_path, monkeypatch):
    """The config takes auto; the step refuses an unresolved auto (it would silently run fp32)."""
    from sdn_dist.training.loop import distill_step
    cfg = load_config("debug", overrides=["autocast=AUTO", "teacher.weights="])
    assert cfg.autocast == "auto"
    (tmp_path / "cpuinfo").write_text(ZEN4)
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "cpuinfo")
    resolved, info = loop.with_resolved_autocast(cfg, torch.device("cpu"))
    assert resolved.autocast == "bf16" and info == {"asked": "auto", "used": "bf16", "why": "avx512_bf16"}
    with pytest.raises(ValueError, match="autocast=auto"):
        distill_step(None, None, torch.zeros(1, 3, 32, 32), torch.zeros(1, cfg.text.dim), stages(cfg.stage1, cfg.stage2)[0], cfg.autocast)
