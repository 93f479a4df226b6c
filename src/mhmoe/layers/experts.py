"""Stacked expert weights and the grouped matmul that applies them.

Shape legend: M assignments sorted by expert, E experts, S expert input size (d_model / h),
F expert hidden size (d_expert).

Weights are stacked 3-D tensors with Mixtral names, in nn.Linear layout per expert:
    w1_EFS, w3_EFS (gate and up, SwiGLU only w3), w2_ESF (down).
SwiGLU expert: w2( silu(w1 x) * (w3 x) );  ReLU expert: w2( relu(w1 x) ).

``grouped_mm`` is the one override point for the grouped matmul. It uses
``torch._grouped_mm`` where the running torch supports it for the device and dtype (CPU in
torch >= 2.9 and CUDA sm90+, float32/bfloat16/float16), and otherwise a segment loop of plain
matmuls (float64, older torch). Both are tested against the per-expert loop reference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s backward rejects gradients with zero or odd strides (for example
    the expanded gradient of ``.sum()``), so its output passes through this.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


@functools.lru_cache(maxsize=None)
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward here for this device and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    try:
        # enable_grad: the probe runs a backward even when the first caller is in no_grad.
        with torch.enable_grad():
            _probe_grouped_mm(device_type, dtype)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> None:
    x = torch.ones(4, 8, device=device_type, dtype=dtype, requires_grad=True)
    w = torch.ones(2, 8, 8, device=device_type, dtype=dtype, requires_grad=True)
    offs = torch.tensor([1, 4], device=device_type, dtype=torch.int32)
    torch._grouped_mm(x, w, offs=offs).backward(torch.ones(4, 8, device=device_type, dtype=dtype))


def grouped_mm_aligned(x_MS: torch.Tensor, w_EFS: torch.Tensor) -> bool:
    """``torch._grouped_mm`` needs 16-byte aligned row strides of its operands and output."""
    element_size = x_MS.element_size()
    return all((size * element_size) % 16 == 0 for size in (w_EFS.shape[1], w_EFS.shape[2]))


def segment_mm(x_MS: torch.Tensor, w_EFS: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
    """Fallback grouped matmul: one plain matmul per contiguous segment of rows.

    Row block e (``counts_E[e]`` rows) is multiplied by ``w_EFS[e]^T``; returns (M, F).
    """
    segments = torch.split(x_MS, counts_E, dim=0)
    outputs = [segment @ w_EFS[e].t() for e, segment in enumerate(segments)]
    if not outputs:
        return x_MS.new_zeros(0, w_EFS.shape[1])
    return torch.cat(outputs, dim=0)


def grouped_mm(
    x_MS: torch.Tensor,
    w_EFS: torch.Tensor,
    offsets_E: torch.Tensor,
    counts_E: list[int] | None = None,
    use_grouped_mm: bool | None = None,
) -> torch.Tensor:
    """y_MF[rows of e] = x_MS[rows of e] @ w_EFS[e]^T, rows sorted by expert.

    ``offsets_E`` are the int32 cumulative row counts (the end of each expert's block);
    ``counts_E`` the same as a Python list for the fallback (computed when not given).
    """
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_supported(x_MS.device.type, x_MS.dtype)
    if use_grouped_mm and grouped_mm_aligned(x_MS, w_EFS):
        y_MF = torch._grouped_mm(x_MS, w_EFS.transpose(1, 2), offs=offsets_E)
        return _ContiguousGrad.apply(y_MF)
    if counts_E is None:
        counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).tolist()
    return segment_mm(x_MS, w_EFS, counts_E)


class Experts(nn.Module):
    """E experts with stacked weights, applied to rows already sorted by expert."""

    def __init__(
        self, num_experts: int, d_in: int, d_expert: int, activation: str = "swiglu"
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.d_in = d_in
        self.d_expert = d_expert
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(num_experts, d_expert, d_in))
        if activation == "swiglu":
            self.w3 = nn.Parameter(torch.empty(num_experts, d_expert, d_in))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_in, d_expert))
        # None: decide per device/dtype; False forces the segment-loop fallback.
        self.use_grouped_mm: bool | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default scale, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for name, param in self.named_parameters():
            bound = param.shape[-1] ** -0.5
            nn.init.uniform_(param, -bound, bound)

    def forward(
        self, x_MS: torch.Tensor, offsets_E: torch.Tensor, counts_E: list[int] | None = None
    ) -> torch.Tensor:
        """Apply expert e to its block of rows; ``offsets_E`` = int32 cumsum of rows per expert."""
        mm = functools.partial(
            grouped_mm, offsets_E=offsets_E, counts_E=counts_E, use_grouped_mm=self.use_grouped_mm
        )
        if self.activation == "swiglu":
            hidden_MF = F.silu(mm(x_MS, self.w1)) * mm(x_MS, self.w3)
        else:
            hidden_MF = F.relu(mm(x_MS, self.w1))
        return mm(hidden_MF, self.w2)

    def forward_one(self, expert: int, x_RS: torch.Tensor) -> torch.Tensor:
        """Reference: expert ``expert`` alone on rows x_RS, with plain matmuls."""
        if self.activation == "swiglu":
            hidden = F.silu(x_RS @ self.w1[expert].t()) * (x_RS @ self.w3[expert].t())
        else:
            hidden = F.relu(x_RS @ self.w1[expert].t())
        return hidden @ self.w2[expert].t()

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_in={self.d_in}, d_expert={self.d_expert}, "
            f"activation={self.activation!r}"
        )
