"""Language backbones: the family table and the adapters."""

from vlmkit.models.language.base import BACKBONES, BackboneSpec, CausalLanguageModel, family_for_model_type
from vlmkit.models.language.families import build_language_model

__all__ = ["BACKBONES", "BackboneSpec", "CausalLanguageModel", "build_language_model", "family_for_model_type"]
