"""The student: VGG19 run backwards, text embedding -> image, one tensor per matched point.

    from sdn_dist.model.student import Student
    student = Student(cfg.model, text_dim=cfg.text.dim)
    g = student(text)                  # text [B, D] -> {point: tensor}, g["image"] [B,3,S,S]

Structure (the method's diagram, generalised to any width / image size):

    text -FC-> g_fc7 -FC-> g_fc6 -FC-> g_pool5 [C5, S/32, S/32]          (ReLU after each)

then the teacher's 21 ops are mirrored in reverse. Where the teacher computes ``X = op(Y)``
the student computes ``g_Y = mirror(g_X)``:

    op = 2x2 pool          -> nearest x2 upsample, no parameters (e.g. g_conv5_4 = up(g_pool5))
    op = 3x3 conv C_in->C_out -> 3x3 conv C_out->C_in at the same resolution + ReLU
                              (e.g. g_pool4 = conv(g_conv5_1), 512->512 at S/16;
                                    g_pool3 = conv(g_conv4_1), 512->256 at S/8)

The last one, mirroring conv1_1, is g_image = conv(g_conv1_1), 64->3, linear (or its sigmoid,
``model.output``). So every g_X has
exactly the teacher's shape at X, and each teacher conv has one student conv (same parameter count
up to the bias). At 224 px / width 1 / text 1024: ~143.8 M parameters, ~102.8 M in the last FC.
No normalisation layers, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdn_dist.config import ModelConfig
from sdn_dist.model.plan import FC7, POINTS, fc_dim, layer_plan


class Student(nn.Module):
    def __init__(self, model_cfg: ModelConfig, text_dim: int):
        super().__init__()
        self.model_cfg = model_cfg
        self.text_dim = text_dim
        self.noise_dim = model_cfg.noise_dim
        plan = layer_plan(model_cfg)
        last = plan[-1]                      # the pool producing pool5
        self.pool5_shape = (last.c_out, last.size, last.size)
        hidden = fc_dim(model_cfg)
        c5, s5, _ = self.pool5_shape

        # model.text_norm: the input standardisation, set by set_text_statistics before training and
        # saved with the weights (buffers).
        self.text_norm = model_cfg.text_norm
        if self.text_norm == "standardize":
            self.register_buffer("text_shift", torch.zeros(text_dim))
            self.register_buffer("text_scale", torch.ones(()))
        self.fc7 = nn.Linear(text_dim + self.noise_dim, hidden)
        self.fc6 = nn.Linear(hidden, hidden)
        self.fc_pool5 = nn.Linear(hidden, c5 * s5 * s5)

        # Reverse plan: (point produced, kind). Convs are keyed by the point they produce.
        self.convs = nn.ModuleDict()
        self._steps: list[tuple[str, str]] = []
        for i in range(len(plan) - 1, -1, -1):
            produced = POINTS[i]             # plan[i] makes POINTS[i + 1] from POINTS[i]
            layer = plan[i]
            if layer.kind == "pool":
                self._steps.append((produced, "up"))
            else:
                self.convs[produced] = nn.Conv2d(layer.c_out, layer.c_in, kernel_size=3, padding=1)
                self._steps.append((produced, "conv"))
        self.reset_parameters(model_cfg.init)

    def reset_parameters(self, init: str = "reference") -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if init == "reference":
                    nn.init.normal_(m.weight, 0.0, 0.02)
                else:
                    # The image conv is linear: He init with gain 1 there, (leaky) ReLU gain elsewhere.
                    lin = m is self.convs["image"]
                    nn.init.kaiming_normal_(m.weight, a=self.model_cfg.negative_slope,
                                            nonlinearity="linear" if lin else "leaky_relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                if init == "reference":
                    nn.init.normal_(m.weight, 0.0, 0.1)
                else:
                    nn.init.kaiming_normal_(m.weight, a=self.model_cfg.negative_slope, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def set_text_statistics(self, stats: dict) -> None:
        """model.text_norm = standardize: {"mean": [text_dim], "std": float} of the training
        captions' embeddings (data.readers.text_statistics)."""
        mean = torch.as_tensor(stats["mean"], dtype=self.text_shift.dtype)
        if mean.shape != self.text_shift.shape or not float(stats["std"]) > 0:
            raise ValueError(f"text statistics of shape {tuple(mean.shape)} / std {stats['std']} do not fit "
                             f"a text input of {self.text_dim}")
        self.text_shift.copy_(mean)
        self.text_scale.fill_(1.0 / float(stats["std"]))

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        slope = self.model_cfg.negative_slope
        return F.leaky_relu(x, slope) if slope else F.relu(x)

    def producer(self, point: str) -> nn.Module | None:
        """The layer whose output is ``point`` (None for a parameter-free upsample)."""
        if point == FC7:
            return self.fc7
        if point == "pool5":
            return self.fc_pool5
        return self.convs[point] if point in self.convs else None

    def forward(self, text: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """text [B, text_dim] (+ noise [B, noise_dim]) -> {point: tensor} in POINTS order, plus
        "fc7" (the first FC output, matched only when model.distill_fc7 is on)."""
        if self.text_norm == "standardize":
            text = (text - self.text_shift) * self.text_scale
        if self.noise_dim:
            if noise is None:
                noise = torch.randn(text.shape[0], self.noise_dim, device=text.device, dtype=text.dtype)
            text = torch.cat([text, noise], dim=1)          # [B, D + N]
        act = self._act
        g_fc7 = act(self.fc7(text))                           # [B, H]
        g_fc6 = act(self.fc6(g_fc7))                          # [B, H]
        x = act(self.fc_pool5(g_fc6))                         # [B, C5*s5*s5]
        x = x.view(x.shape[0], *self.pool5_shape)             # [B, C5, s5, s5] = g_pool5
        out = {"pool5": x}
        for point, kind in self._steps:
            if kind == "up":
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            else:
                x = self.convs[point](x)
                if point != "image":
                    x = act(x)
                elif self.model_cfg.output == "sigmoid":   # else linear, the paper's: pixels are a regression target
                    x = torch.sigmoid(x)
            out[point] = x
        g = {p: out[p] for p in POINTS}
        if self.model_cfg.distill_fc7:
            g[FC7] = g_fc7
        return g
