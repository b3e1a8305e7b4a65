"""Drop-in nn.Modules built on the fastattn ops."""
from .attention import ETAAttention, TargetAttention
from .mimn import MIMNEncoder
from .reliable import ReliableAttention, SequenceAdversarial

__all__ = ["TargetAttention", "ETAAttention", "MIMNEncoder"]
__all__ += ["ReliableAttention", "SequenceAdversarial"]
