"""VGG19 structure shared by the teacher, the student and the model table.

    from sdn_dist.model.plan import POINTS, point_shapes, layer_plan
    point_shapes(cfg.model)["pool5"]   # (512, 7, 7) at 224 px, width 1

Only structure lives here (channel counts, the 22 matched points, their shapes); the layers
themselves come from torchvision (teacher) or mirror this plan (student).
"""

from __future__ import annotations

from dataclasses import dataclass

from torchvision.models.vgg import cfgs

from sdn_dist.config import ModelConfig

# torchvision's configuration "E" is VGG19: 16 convs (ints = output channels), 5 pools ("M").
VGG19_CFG: list[int | str] = list(cfgs["E"])

# The 22 matched points, shallow to deep: the pixels, then every conv (after its ReLU) and every
# pooling output of the trunk. Teacher and student both return exactly these, in this order.
POINTS: tuple[str, ...] = (
    "image",
    "conv1_1", "conv1_2", "pool1",
    "conv2_1", "conv2_2", "pool2",
    "conv3_1", "conv3_2", "conv3_3", "conv3_4", "pool3",
    "conv4_1", "conv4_2", "conv4_3", "conv4_4", "pool4",
    "conv5_1", "conv5_2", "conv5_3", "conv5_4", "pool5",
)

# Optional extra point (ModelConfig.distill_fc7): the teacher classifier's fc7 after its ReLU,
# matched with the student's first FC output.
FC7 = "fc7"


def scale_channels(c: int, width: float) -> int:
    return max(1, round(c * width))


def scaled_cfg(width: float) -> list[int | str]:
    """torchvision's VGG19 cfg "E" with every channel count scaled by ``width``."""
    return [v if v == "M" else scale_channels(int(v), width) for v in VGG19_CFG]


def fc_dim(model_cfg: ModelConfig) -> int:
    """Width of fc6/fc7 (student, and the teacher classifier when fc7 is distilled)."""
    return model_cfg.fc_dim or scale_channels(4096, model_cfg.width)


@dataclass(frozen=True)
class Layer:
    """One teacher op: ``point`` = op(previous point). kind 'conv' (3x3 + ReLU) or 'pool' (2x2/2)."""

    point: str
    kind: str
    c_in: int
    c_out: int
    size: int  # output side in pixels


def layer_plan(model_cfg: ModelConfig) -> list[Layer]:
    """The 21 teacher ops in forward order; POINTS[i + 1] is produced by plan[i]."""
    plan, c, size = [], 3, model_cfg.image_size
    names = iter(POINTS[1:])
    for v in scaled_cfg(model_cfg.width):
        if v == "M":
            size //= 2
            plan.append(Layer(next(names), "pool", c, c, size))
        else:
            plan.append(Layer(next(names), "conv", c, int(v), size))
            c = int(v)
    return plan


def point_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of every matched point, in POINTS order (without the batch dimension)."""
    s = model_cfg.image_size
    shapes = {"image": (3, s, s)}
    for layer in layer_plan(model_cfg):
        shapes[layer.point] = (layer.c_out, layer.size, layer.size)
    return shapes
