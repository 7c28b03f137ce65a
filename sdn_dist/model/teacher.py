"""The frozen VGG19 teacher: the 22 matched activations of an image.

    from sdn_dist.model.teacher import build_teacher
    teacher = build_teacher(cfg.model, cfg.teacher)      # frozen, eval, weights loaded
    acts = teacher(images)                               # images [B,3,S,S] in [0, 1]
    acts["image"] is images; acts["pool5"].shape == (B, C5, S/32, S/32)

The trunk is torchvision's own ``make_layers`` on its VGG19 cfg "E" (channels scaled by
``model.width``), so at width 1 the state-dict keys are exactly torchvision's vgg19 ones
(``features.N.weight``, optional ``classifier.{0,3,6}.*``) and the ImageNet weights load as is.
torchvision's ``VGG`` class itself is not instantiated: its classifier is hard-wired to
512*7*7 -> 4096 -> 4096 (~120 M parameters) even when the trunk is scaled down and the
classifier is not used; the same layout is built here only when fc7 is distilled.

Frozen means: ``requires_grad`` off on every parameter, always in eval mode (``train()`` is a
no-op), never in an optimizer (:meth:`Teacher.check_not_in`). Gradients still flow through it to
its *input*, which stage 2 needs (generated image -> teacher -> loss -> student).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torchvision.models.vgg import make_layers

from sdn_dist import fsio
from sdn_dist.config import ModelConfig, TeacherConfig
from sdn_dist.errors import WeightsError
from sdn_dist.model.plan import FC7, fc_dim, layer_plan, scaled_cfg

# What torchvision's ImageNet weights expect after ToTensor() (RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Format tag of `sdn-dist teacher train` output files (see :func:`load_teacher_weights`).
TEACHER_FORMAT = "sdn-dist-teacher/1"
# teacher.weights value naming the random-init teacher: the ablation, chosen on purpose.
RANDOM_TEACHER = "random"


class Teacher(nn.Module):
    """VGG19 trunk (torchvision layers) returning every matched point.

    ``mean``/``std`` of None means the input is fed unnormalised. ``num_classes`` > 0 adds the
    torchvision classifier layout (fc6 -> fc7 -> fc8, hidden width ``fc_dim(model_cfg)``) so
    that ``forward`` also returns "fc7".
    """

    def __init__(self, model_cfg: ModelConfig, *, mean: Iterable[float] | None = IMAGENET_MEAN,
                 std: Iterable[float] | None = IMAGENET_STD, num_classes: int = 0):
        super().__init__()
        self.model_cfg = model_cfg
        self.features = make_layers(scaled_cfg(model_cfg.width), batch_norm=False)
        if model_cfg.pool == "avg":
            # The method's choice: average pooling in place of max (smoother gradients for stage 2,
            # and the pooled values are what the student mirrors). No parameters, keys unchanged.
            for i, m in enumerate(self.features):
                if isinstance(m, nn.MaxPool2d):
                    self.features[i] = nn.AvgPool2d(kernel_size=2, stride=2)
        # Index in self.features after which each matched point is read: a conv's point is its
        # ReLU output (conv at i, ReLU at i + 1), a pool's point is the pool output.
        self._taps: dict[int, str] = {}
        i = 0
        for layer in layer_plan(model_cfg):
            i += 2 if layer.kind == "conv" else 1
            self._taps[i - 1] = layer.point
        assert i == len(self.features)

        self.classifier: nn.Sequential | None = None
        if num_classes:
            c5, hidden = scaled_cfg(model_cfg.width)[-2], fc_dim(model_cfg)
            # torchvision's VGG layout (indices 0/3/6 are the Linear layers), so keys match.
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(int(c5) * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(0.5),
                nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(0.5),
                nn.Linear(hidden, num_classes),
            )

        # Non-persistent: the state dict stays exactly torchvision's key set.
        if mean is None or std is None:
            self.register_buffer("mean", None, persistent=False)
            self.register_buffer("std", None, persistent=False)
        else:
            self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._frozen = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision VGG's own init (used for a random teacher and to start teacher training)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    # -- frozen-ness ---------------------------------------------------------------------------
    def freeze(self) -> "Teacher":
        self.requires_grad_(False)
        self._frozen = True
        return super().train(False)

    @property
    def frozen(self) -> bool:
        return self._frozen

    def train(self, mode: bool = True) -> "Teacher":
        # A frozen teacher stays in eval whatever a trainer calls on it (dropout in fc7 off).
        return super().train(False if self._frozen else mode)

    def check_not_in(self, optimizer: Any) -> None:
        """Raise if any teacher parameter is in ``optimizer`` (anything with ``param_groups``)."""
        mine = {id(p) for p in self.parameters()}
        for group in getattr(optimizer, "param_groups", []):
            for p in group["params"]:
                if id(p) in mine:
                    raise RuntimeError("a teacher parameter is in the optimizer: the teacher must stay frozen")

    # -- forward -------------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return images
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images [B,3,S,S] in [0,1] -> {point: activation} for all 22 points (+ "fc7")."""
        out = {"image": images}
        x = self.normalize(images)
        for i, m in enumerate(self.features):
            x = m(x)
            point = self._taps.get(i)
            if point is not None:
                out[point] = x
        if self.classifier is not None:
            h = torch.flatten(self.avgpool(x), 1)  # [B, C5, 7, 7] -> [B, C5*49]
            out[FC7] = self.classifier[:5](h)       # fc6, ReLU, dropout, fc7, ReLU
        return out

    # -- weights -------------------------------------------------------------------------------
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], source: str,
                     meta: Mapping[str, Any] | None = None) -> None:
        """Strict for what the teacher uses: every key present with the right shape, no stray
        ``features.*`` key. Other keys (classifier when fc7 is off, heads) are ignored."""
        meta = meta or {}
        hint = f" (the file records width {meta['width']})" if "width" in meta else ""
        own = self.state_dict()
        for key, want in own.items():
            if key not in state_dict:
                raise WeightsError(f"teacher weights {source}: missing key '{key}' "
                                   f"(expected shape {tuple(want.shape)}){hint}")
            got = state_dict[key]
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                what = (f"model.fc_dim={fc_dim(self.model_cfg)}" if key.startswith("classifier.")
                        else f"model.width={self.model_cfg.width}")
                raise WeightsError(f"teacher weights {source}: key '{key}' has shape {shape}, "
                                   f"{what} needs {tuple(want.shape)}{hint}")
        for key in state_dict:
            if key.startswith("features.") and key not in own:
                raise WeightsError(f"teacher weights {source}: unexpected key '{key}' "
                                   f"(shape {tuple(state_dict[key].shape)}); expected plain VGG19 "
                                   f"(no batch norm) with {len([k for k in own if k.startswith('features.')])} features.* tensors")
        self.load_state_dict({k: state_dict[k] for k in own}, strict=True)
        if meta.get("pool") and meta["pool"] != self.model_cfg.pool:
            warnings.warn(f"teacher weights {source} were trained with {meta['pool']} pooling, "
                          f"used with model.pool={self.model_cfg.pool}", stacklevel=2)
        if meta.get("image_size") and meta["image_size"] != self.model_cfg.image_size:
            warnings.warn(f"teacher weights {source} were trained at {meta['image_size']} px, "
                          f"used at model.image_size={self.model_cfg.image_size}", stacklevel=2)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def load_teacher_weights(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read teacher weights from any fsspec URL -> (state_dict, meta).

    Accepts (a) a plain torchvision VGG19 state dict (meta says ImageNet normalisation), or
    (b) a ``sdn-dist teacher train`` file: ``{"format": "sdn-dist-teacher/1", "state_dict":
    {torchvision keys}, "heads": {...}, "meta": {width, image_size, pool, normalize, mean, std,
    heads, ...}}``. Raises WeightsError naming the file for anything else.
    """
    obj = fsio.load_torch(url, "teacher weights", WeightsError)

    if isinstance(obj, dict) and "format" in obj:
        if obj["format"] != TEACHER_FORMAT:
            raise WeightsError(f"teacher weights {url}: unknown format {obj['format']!r} (expected {TEACHER_FORMAT!r})")
        sd, meta = obj.get("state_dict"), obj.get("meta", {})
        if not isinstance(meta, dict):
            raise WeightsError(f"teacher weights {url}: 'meta' is a {type(meta).__name__}, not a dict")
        meta = dict(meta, format=TEACHER_FORMAT)
        if isinstance(obj.get("heads"), dict):
            meta["heads_state_dict"] = obj["heads"]
    else:
        # Common wrappers around a plain state dict.
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        meta = {"format": "torchvision", "normalize": "imagenet",
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    if not isinstance(sd, dict) or not sd:
        raise WeightsError(f"teacher weights {url}: expected a VGG19 state dict, got {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"teacher weights {url}: key '{k}' is a {type(v).__name__}, not a tensor")
    return sd, meta


def _normalisation(mode: str, meta: Mapping[str, Any]) -> tuple[Any, Any]:
    if mode == "none":
        return None, None
    if mode == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    # auto: what the weights were trained with; ImageNet for torchvision files and random init.
    if meta.get("normalize") == "none":
        return None, None
    if "mean" in meta and "std" in meta:
        return tuple(meta["mean"]), tuple(meta["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def build_teacher(model_cfg: ModelConfig, teacher_cfg: TeacherConfig) -> Teacher:
    """The frozen teacher: structure from ``model_cfg``, weights from ``teacher_cfg.weights``
    (``random`` or empty: torchvision's random init, the ablation), normalisation per
    ``teacher_cfg.normalize``."""
    url = "" if teacher_cfg.weights == RANDOM_TEACHER else teacher_cfg.weights
    sd, meta = load_teacher_weights(url) if url else (None, {})
    num_classes = 0
    if model_cfg.distill_fc7:
        if sd is None:
            num_classes = 1000
        elif "classifier.6.weight" not in sd:
            raise WeightsError(f"teacher weights {url}: model.distill_fc7 needs the VGG classifier "
                               f"(classifier.* keys) and the file has none")
        else:
            num_classes = int(sd["classifier.6.weight"].shape[0])
    mean, std = _normalisation(teacher_cfg.normalize, meta)
    teacher = Teacher(model_cfg, mean=mean, std=std, num_classes=num_classes)
    if sd is not None:
        teacher.load_weights(sd, url, meta)
    return teacher.freeze()
