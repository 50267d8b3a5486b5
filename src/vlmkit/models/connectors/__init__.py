"""Connectors between vision tokens and the language model's embedding space."""

from vlmkit.models.connectors import projectors  # noqa: F401  (registers linear, mlpNx_gelu)
from vlmkit.models.connectors.base import CONNECTORS, Connector, TokenMerge

__all__ = ["CONNECTORS", "Connector", "TokenMerge"]
