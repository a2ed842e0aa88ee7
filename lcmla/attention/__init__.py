"""Identity-branch attention: FastFace's transforms, the identity-attention processor and map capture."""

from .transforms import adain_blend, minmax_norm, quantile_over_queries, scale_power, scheduled_softmask

__all__ = ["adain_blend", "minmax_norm", "quantile_over_queries", "scale_power", "scheduled_softmask"]
