"""Drop-in nn.Modules built on the fastattn ops."""
from .attention import ETAAttention, TargetAttention, log_soft_count
from .bahe import AtomicBehaviourEncoder, BehaviourTable, TokenEncoder, TokenTransformer
from .mimn import MIMNEncoder
from .reliable import ReliableAttention, SequenceAdversarial

__all__ = ["TargetAttention", "ETAAttention", "MIMNEncoder", "AtomicBehaviourEncoder",
           "BehaviourTable", "TokenEncoder", "TokenTransformer", "ReliableAttention",
           "SequenceAdversarial", "log_soft_count"]
