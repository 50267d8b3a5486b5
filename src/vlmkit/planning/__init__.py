"""Per-device memory and FLOPs of a training recipe, before any weight is downloaded (``vlmkit plan``).

``plan_recipe(recipe, overrides, PlanOptions(gpus=8, gpu_memory=80 * 10**9))`` returns a :class:`Plan`;
:func:`format_plan` prints it; :func:`add_plan_parser` adds the ``plan`` command to ``vlmkit``'s parser.
:data:`KNOWN_ARCHITECTURES` holds the shapes of the hub checkpoints recipes name.

Names are imported on first use, so building the command line (``add_plan_parser``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "KNOWN_ARCHITECTURES": "architectures", "KnownArchitecture": "architectures", "architecture_config": "architectures",
    "offline_model_config": "architectures", "add_plan_parser": "cli", "cmd_plan": "cli", "parse_memory": "cli",
    "Plan": "plan", "PlanOptions": "plan", "StagePlan": "plan", "plan_recipe": "plan", "format_plan": "report",
    "parameter_counts": "counts",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'vlmkit.planning' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vlmkit.planning.{_WHERE[name]}"), name)
