"""Drop-in nn.Modules built on the fastattn ops."""
from .attention import ETAAttention, TargetAttention

__all__ = ["TargetAttention", "ETAAttention"]
