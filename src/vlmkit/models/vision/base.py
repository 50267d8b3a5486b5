"""The vision encoder interface: a Hugging Face vision tower that returns a sequence of visual tokens.

Two layouts cover every tower transformers ships:

* ``sequence`` towers (CLIP, SigLIP, ViT, DINOv2): hidden states are ``(B, T, D)``; a CLS token,
  when the tower has one, can be dropped (LLaVA's ``patch`` selection).
* ``grid`` towers (ResNet, ConvNeXt, BiT): hidden states are feature maps ``(B, C, H, W)``; the
  chosen stage's map becomes ``H*W`` tokens of width ``C``, row-major.

A family registered with layout ``auto`` (the generic ``automodel`` entry) has its layout and
leading tokens found by one probe forward when the tower is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlmkit.registry import ANY_MODEL_TYPE, Registry

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
LAYOUTS = ("sequence", "grid", "auto")


@dataclass(frozen=True)
class VisionTowerSpec:
    """How to build and read one family of Hugging Face vision towers.

    Attributes:
        name: registry id.
        model_class: transformers class of the tower (``CLIPVisionModel``...).
        config_class: transformers config class used to build a tower from scratch.
        model_types: ``model_type`` values this family accepts; a composite config whose
            ``vision_config`` has one of them (e.g. a full ``clip`` config) is accepted too. ``*``:
            any vision model ``AutoModel`` builds (the generic family).
        layout: ``sequence``, ``grid`` (see module docstring) or ``auto`` (found by a probe at build time).
        has_cls: the tower prepends a CLS token to its sequence.
        mean: default normalisation mean when no preprocessor config is found.
        std: default normalisation std.
        description: one line for ``vlmkit list encoders``.
        example: a real checkpoint of this family.
        default_config: config fields applied before the recipe's when building from scratch.
        prefix_tokens: leading non-patch tokens ``drop_cls`` removes (CLS, distillation, register
            tokens); ``None`` means one when ``has_cls``.
        patch_grid: the sequence is ``(S / patch_size)**2`` patches plus the prefix tokens, so its
            length follows from the config without a forward pass.
        composite_prefix: where the tower's weights sit in a composite checkpoint of the family (BLIP-2's
            ``vision_model``), when the tower class does not hold that attribute itself (CLIP's does).
    """

    name: str
    model_class: str
    config_class: str
    model_types: tuple[str, ...]
    layout: str
    has_cls: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str
    example: str = ""
    default_config: dict = field(default_factory=dict)
    prefix_tokens: int | None = None
    patch_grid: bool = True
    composite_prefix: str = ""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"vision tower {self.name!r}: layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")

    @property
    def generic(self) -> bool:
        """Whether the family takes any vision ``model_type`` (``*``) rather than a fixed list."""
        return ANY_MODEL_TYPE in self.model_types

    @property
    def num_prefix_tokens(self) -> int:
        """Leading tokens that are not patches (dropped with ``drop_cls``)."""
        return int(self.has_cls) if self.prefix_tokens is None else self.prefix_tokens


VISION_TOWERS: Registry[VisionTowerSpec] = Registry("vision encoder")


class VisionEncoder(nn.Module):
    """Wraps a vision tower and returns the visual tokens of one chosen layer.

    Args:
        tower: the Hugging Face vision model.
        spec: its family spec (layout, CLS); layout ``auto`` must be resolved before (see
            :func:`vlmkit.models.vision.towers.build_vision_encoder`).
        feature_layer: index into the tower's hidden states (-1 last, -2 penultimate). For grid
            towers the hidden states are the stem output followed by each stage.
        drop_cls: drop the CLS token of sequence towers that have one.
        image_size: the square input resolution the processor produces.
        image_mean / image_std: normalisation the processor applies.

    Shapes:
        ``forward(pixel_values: (B, 3, S, S)) -> (B, num_tokens, hidden_size)``.
    """

    def __init__(
        self,
        tower: nn.Module,
        spec: VisionTowerSpec,
        feature_layer: int,
        drop_cls: bool,
        image_size: int,
        image_mean: tuple[float, float, float],
        image_std: tuple[float, float, float],
    ):
        super().__init__()
        if spec.layout not in ("sequence", "grid"):
            raise ValueError(f"vision tower {spec.name!r}: layout {spec.layout!r} must be resolved to sequence or grid first")
        self.tower = tower
        self.spec = spec
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls and spec.has_cls
        self.image_size = image_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.num_tokens, self.hidden_size = self._probe_shape()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    def _check_layer(self, n: int) -> None:
        if not -n <= self.feature_layer < n:
            raise ValueError(
                f"model.vision.feature_layer={self.feature_layer} is out of range: this "
                f"{self.spec.name} tower exposes {n} hidden states (valid: {-n}..{n - 1})"
            )

    def _select(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        self._check_layer(len(hidden_states))
        feats = hidden_states[self.feature_layer]
        if self.spec.layout == "grid":
            return feats.flatten(2).transpose(1, 2)
        return feats[:, self.spec.num_prefix_tokens :] if self.drop_cls else feats

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Visual tokens ``(B, N, D)`` for images ``(B, 3, S, S)``."""
        out = self.tower(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
        return self._select(out.hidden_states)

    def unused_parameters(self) -> list[str]:
        """Names of tower parameters the selected features do not depend on (layers after
        ``feature_layer``, a pooler or post-norm that only feeds the pooled output).

        Found with one probe forward/backward on a single image; training them would only leave
        gradients of ``None`` (and break DDP), so trainability policies freeze them.
        """
        p = next(self.tower.parameters())
        probe = torch.zeros(1, 3, self.image_size, self.image_size, dtype=p.dtype, device=p.device)
        flags = {n: q.requires_grad for n, q in self.tower.named_parameters()}
        grads = {n: q.grad for n, q in self.tower.named_parameters()}
        was_training = self.tower.training
        try:
            for q in self.tower.parameters():
                q.requires_grad_(True)
                q.grad = None
            self.tower.eval()
            with torch.enable_grad():
                self.forward(probe).float().sum().backward()
            unused = [n for n, q in self.tower.named_parameters() if q.grad is None]
        finally:
            for n, q in self.tower.named_parameters():
                q.requires_grad_(flags[n])
                q.grad = grads[n]
            self.tower.train(was_training)
        return unused

    def _probe_shape(self) -> tuple[int, int]:
        config = self.tower.config
        if self.spec.layout == "sequence" and self.spec.patch_grid and hasattr(config, "patch_size"):
            # exact for square inputs; avoids a forward pass through large pretrained towers
            self._check_layer(config.num_hidden_layers + 1)
            side = self.image_size // config.patch_size
            extra = 0 if self.drop_cls else self.spec.num_prefix_tokens
            return side * side + extra, config.hidden_size
        with torch.no_grad():
            p = next(self.tower.parameters())
            probe = torch.zeros(1, 3, self.image_size, self.image_size, dtype=p.dtype, device=p.device)
            was_training = self.tower.training
            self.tower.eval()
            feats = self.forward(probe)
            self.tower.train(was_training)
        return feats.shape[1], feats.shape[2]
