"""MIMN user-interest encoder: NTM memory with MUR plus the Memory Induction Unit."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops.mimn import MIMNParams, MIMNState, mimn_reg_loss, mimn_scan, mimn_step

__all__ = ["MIMNEncoder"]


class MIMNEncoder(nn.Module):
    """Compresses a behaviour sequence into an (slots × mem_dim) memory and per-channel MIU
    states (DESIGN.md §5), with the fused ``mimn_scan`` kernel.

    Submodules (standard torch layouts, so weights move between implementations):
    ``controller`` nn.GRUCell(x_dim + mem_dim, ctrl_dim); ``heads`` nn.Linear(ctrl_dim,
    4·mem_dim + 2) with output columns [k_r, beta_r, k_w, beta_w, e, a]; ``mem0``
    Parameter (slots, mem_dim); ``mur`` nn.Linear(slots, slots) or None; ``miu``
    nn.GRUCell(mem_dim + x_dim, miu_dim) or None (when ``miu_k`` = 0).

    ``forward(x (B, T, x_dim), lengths=None, state=None) -> (reads (B, T, mem_dim), state)``;
    ``step(x_t (B, x_dim), state=None) -> (read (B, mem_dim), state)`` is the per-event
    serving update, equal to ``forward`` over the streamed events; ``reg_loss(state)`` is the
    MUR regulariser (multiply by your λ).
    """

    def __init__(self, x_dim: int, mem_dim: int, slots: int, ctrl_dim: int, miu_dim: int,
                 mur: bool = True, miu_k: int = 1, backend: Optional[str] = None):
        super().__init__()
        for name, v in (("x_dim", x_dim), ("mem_dim", mem_dim), ("slots", slots),
                        ("ctrl_dim", ctrl_dim)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if not 0 <= miu_k <= slots:
            raise ValueError(f"miu_k must lie in [0, slots={slots}], got {miu_k}")
        if miu_k and miu_dim < 1:
            raise ValueError(f"miu_dim must be >= 1 when miu_k >= 1, got {miu_dim}")
        self.x_dim, self.mem_dim, self.slots = x_dim, mem_dim, slots
        self.miu_k, self.backend = miu_k, backend
        self.miu_dim = miu_dim if miu_k else 0
        self.controller = nn.GRUCell(x_dim + mem_dim, ctrl_dim)
        self.heads = nn.Linear(ctrl_dim, 4 * mem_dim + 2)
        # Random, not zero, initial memory: identical rows would get identical weights forever.
        self.mem0 = nn.Parameter(torch.empty(slots, mem_dim).uniform_(
            -1 / math.sqrt(mem_dim), 1 / math.sqrt(mem_dim)))
        self.mur = nn.Linear(slots, slots) if mur else None
        self.miu = nn.GRUCell(mem_dim + x_dim, miu_dim) if miu_k else None

    def params(self) -> MIMNParams:
        """The weights as the ops take them (views of this module's parameters)."""
        c, mur, miu = self.controller, self.mur, self.miu
        return MIMNParams(
            c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh, self.heads.weight, self.heads.bias,
            self.mem0,
            None if mur is None else mur.weight, None if mur is None else mur.bias,
            None if miu is None else miu.weight_ih, None if miu is None else miu.weight_hh,
            None if miu is None else miu.bias_ih, None if miu is None else miu.bias_hh,
            self.miu_k)

    def initial_state(self, batch: int) -> MIMNState:
        """h = r = g = 0, S = 0, M = mem0 (a broadcast view, no copy)."""
        m, D = self.mem0.shape
        z = self.mem0.new_zeros
        return MIMNState(z(batch, self.controller.hidden_size), z(batch, D),
                         self.mem0.expand(batch, m, D), z(batch, m), z(batch, m, self.miu_dim))

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None,
                state: Optional[MIMNState] = None) -> Tuple[Tensor, MIMNState]:
        state = self.initial_state(x.shape[0]) if state is None else state
        return mimn_scan(x, lengths, self.params(), state, backend=self.backend)

    def step(self, x_t: Tensor, state: Optional[MIMNState] = None) -> Tuple[Tensor, MIMNState]:
        state = self.initial_state(x_t.shape[0]) if state is None else state
        return mimn_step(x_t, state, self.params(), backend=self.backend)

    @staticmethod
    def reg_loss(state: MIMNState) -> Tensor:
        return mimn_reg_loss(state.g)
