"""Drop-in nn.Modules built on the fastattn ops."""
from .attention import ETAAttention, TargetAttention
from .mimn import MIMNEncoder

__all__ = ["TargetAttention", "ETAAttention", "MIMNEncoder"]
