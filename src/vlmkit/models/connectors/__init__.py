"""Connectors between vision tokens and the language model's embedding space.

Importing this package registers every connector in :data:`CONNECTORS`.
"""

from vlmkit.models.connectors import (  # noqa: F401  (each module registers its connectors on import)
    abstractor,  # c_abstractor
    ldp,  # ldp, ldpv2
    pooling,  # avgpool
    projectors,  # linear, mlpNx_gelu
    qformer,  # qformer
    resampler,  # resampler
)
from vlmkit.models.connectors.base import CONNECTORS, Connector, TokenMerge

__all__ = ["CONNECTORS", "Connector", "TokenMerge"]
