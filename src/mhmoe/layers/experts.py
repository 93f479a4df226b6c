"""Stacked expert weights and the grouped matmul that applies them.

Shape legend: M assignments sorted by expert, E experts, S expert input size (d_model / h),
F expert hidden size (d_expert).

Weights are stacked 3-D tensors with Mixtral names, in nn.Linear layout per expert:
    w1_EFS, w3_EFS (gate and up, SwiGLU only w3), w2_ESF (down).
SwiGLU expert: w2( silu(w1 x) * (w3 x) );  ReLU expert: w2( relu(w1 x) ).

The dispatch backends of ``mhmoe.layers.moe`` run them over rows sorted by expert; the
registry (``DISPATCH_BACKENDS``) and the choice per call (``select_backend``) live here, next to
the math the two fast backends use:

* ``"grouped"``: ``Experts.forward``, where ``grouped_mm`` is the one override point for the
  grouped matmul. It uses ``torch._grouped_mm`` where the running torch supports it for the
  device and dtype (CPU in torch >= 2.9 and CUDA sm90+, float32/bfloat16/float16), and otherwise
  a segment loop of plain matmuls (float64, older torch). Autograd records every op; the whole
  (M, F) hidden activations are materialised and saved (gate and up in one grouped matmul
  against ``cat(w1, w3)``). Used on GPUs, under ``torch.compile``, for experts with their own
  forward (BitNet), and on CPU when the experts get few rows each
  (``Experts.blocked_min_rows_per_expert``), where it issues far fewer ops.
* ``"blocked"``: expert by expert, the up projection(s), activation and down projection run on
  one block of rows while it is in cache (``block_forward`` / ``block_backward``), gate and up
  fused into one matmul against ``cat(w1, w3)`` (E, 2F, S). The hidden pre-activations are
  kept for backward only while they are small (``Experts.save_hidden_max_bytes``); above that
  they are recomputed in backward (one extra up-projection matmul), which on CPU is cheaper than
  writing them to memory and reading them back. ``mhmoe.layers.moe`` wraps it in one autograd
  Function with the gather and the combine. On CPU with many rows per expert this is the fast
  path: element-wise SwiGLU work on an in-cache block runs ~5x faster than over the whole
  (M, F) tensor, and the matmuls see the same shapes as ``_grouped_mm`` (which on CPU is itself
  a loop of per-expert matmuls).

Every backend is tested against the per-expert loop reference (``forward_one``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

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
        # Identity saved-tensor hooks: the probe's tensors stay out of an enclosing activation
        # checkpoint, whose recompute (the cache answering at once) would save fewer tensors.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
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

    Under autocast, float32 rows are cast to the autocast dtype first, as autocast casts the
    operands of a plain matmul: ``torch._grouped_mm`` has no autocast rule, and on CUDA its
    only fast kernel is bfloat16 (sm90+); float32 operands take its fallback, which reads the
    offsets back to the host (a sync per call) and runs float32 matmuls. Without this cast an
    SMoE layer under bf16 autocast (its rows come from the float32 residual stream, no head
    layer in between) would do both.
    """
    device_type = x_MS.device.type
    if x_MS.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        x_MS = x_MS.to(torch.get_autocast_dtype(device_type))
    if w_EFS.dtype != x_MS.dtype:
        # Autocast does not cover torch._grouped_mm on every device (not on CPU): cast as
        # autocast would, to the activations' dtype.
        w_EFS = w_EFS.to(x_MS.dtype)
    if torch.compiler.is_compiling():
        # Under torch.compile the op is traced with fake tensors, whose rule for _grouped_mm
        # (torch 2.13) accepts bfloat16 only: other dtypes take the segment loop, which breaks
        # the graph at the row counts (docs/benchmarks.md, "torch.compile").
        use_grouped_mm = (
            use_grouped_mm is not False
            and x_MS.dtype == torch.bfloat16
            and hasattr(torch, "_grouped_mm")
        )
    elif use_grouped_mm is None:
        use_grouped_mm = grouped_mm_supported(x_MS.device.type, x_MS.dtype)
    if use_grouped_mm and grouped_mm_aligned(x_MS, w_EFS):
        y_MF = torch._grouped_mm(x_MS, w_EFS.transpose(1, 2), offs=offsets_E)
        return _ContiguousGrad.apply(y_MF)
    if counts_E is None:
        counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).tolist()
    return segment_mm(x_MS, w_EFS, counts_E)


DispatchCompute = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, nn.Module], torch.Tensor
]
"""Steps 2-4 of ``mhmoe.layers.moe`` (permute, experts, unpermute and combine), one signature
for every backend: ``compute(x_NS, weights_NK, kept_order_R, kept_counts_E, experts) -> y_NS``
with kept_order_R the assignment index m = n*K + k of each row sorted by expert and
kept_counts_E the rows per expert (see ``sort_assignments``)."""


@dataclass(frozen=True)
class DispatchBackend:
    """A registered way to run the experts over the sorted assignments."""

    compute: DispatchCompute
    # True when compute reads the raw stacked weights instead of calling the experts' forward:
    # it would bypass the math of experts that bring their own (BitNet's quantised experts).
    reads_raw_weights: bool = False


DISPATCH_BACKENDS: dict[str, DispatchBackend] = {}
"""Name -> backend, the names ``Experts.implementation`` accepts; ``mhmoe.layers.moe`` registers
"grouped", "blocked" and "reference"."""

_silu_backward = torch.ops.aten.silu_backward
_threshold_backward = torch.ops.aten.threshold_backward


def fused_up_weight(w1_EFS: torch.Tensor, w3_EFS: torch.Tensor | None) -> torch.Tensor:
    """Gate and up projections stacked on the hidden axis: (E, 2F, S) for SwiGLU, w1 for ReLU.

    A copy of the expert weights per call (E * 2F * S elements, small next to the activations).
    """
    if w3_EFS is None:
        return w1_EFS
    return torch.cat([w1_EFS, w3_EFS], dim=1)  # 2 x (E, F, S) -> (E, 2F, S)


def block_forward(
    x_rS: torch.Tensor,
    w_up_GS: torch.Tensor,
    w2_SF: torch.Tensor,
    swiglu: bool,
    out_rS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert on one block of r rows: w2( act(x w_up^T) ), G = 2F (SwiGLU) or F (ReLU).

    Returns the output (r, S) and the pre-activations h_rG (r, G), which ``block_backward``
    can reuse instead of recomputing them.
    """
    h_rG = torch.mm(x_rS, w_up_GS.t())
    if swiglu:
        d_hidden = w_up_GS.shape[0] // 2
        act_rF = F.silu(h_rG[:, :d_hidden]).mul_(h_rG[:, d_hidden:])
    else:
        act_rF = torch.relu(h_rG)
    return torch.mm(act_rF, w2_SF.t(), out=out_rS), h_rG


def block_backward(
    x_rS: torch.Tensor,
    grad_rS: torch.Tensor,
    weight_r1: torch.Tensor | None,
    w_up_GS: torch.Tensor,
    w2_SF: torch.Tensor,
    swiglu: bool,
    grad_w_up_GS: torch.Tensor,
    grad_w2_SF: torch.Tensor,
    grad_x_rS: torch.Tensor | None,
    need_weight_grad: bool = True,
    h_rG: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Backward of ``weight_r1 * block_forward(x_rS)`` for one expert, hidden recomputed.

    ``grad_rS`` is the gradient of the weighted output's sum target (dL/dy_n of the rows'
    units), unweighted; ``weight_r1`` the rows' combine weights (None: weight 1). Writes the
    weight gradients into ``grad_w_up_GS`` / ``grad_w2_SF`` and, when given, the input
    gradient into ``grad_x_rS``; returns dL/dweight_r = <grad_r, Expert(x_r)>
    = <grad_r w2, act_r> (so the expert output need not be saved), or None. ``h_rG``: the
    pre-activations saved by ``block_forward``; recomputed when None.
    """
    if h_rG is None:
        h_rG = torch.mm(x_rS, w_up_GS.t())  # recompute the pre-activations
    grad_act_rF = torch.mm(grad_rS, w2_SF)  # unweighted
    if swiglu:
        d_hidden = w_up_GS.shape[0] // 2
        gate_rF, up_rF = h_rG[:, :d_hidden], h_rG[:, d_hidden:]
        silu_rF = F.silu(gate_rF)
        act_rF = silu_rF * up_rF
    else:
        act_rF = torch.relu(h_rG)
    grad_weight_r = None
    if weight_r1 is not None:
        if need_weight_grad:
            grad_weight_r = torch.linalg.vecdot(grad_act_rF, act_rF)
        grad_rS = grad_rS * weight_r1
        grad_act_rF.mul_(weight_r1)
    torch.mm(grad_rS.t(), act_rF, out=grad_w2_SF)  # d/d w2 = grad^T act
    if swiglu:
        grad_h_rG = torch.empty_like(h_rG)
        torch.mul(grad_act_rF, silu_rF, out=grad_h_rG[:, d_hidden:])  # d/d up
        grad_act_rF.mul_(up_rF)
        _silu_backward(grad_act_rF, gate_rF, grad_input=grad_h_rG[:, :d_hidden])  # d/d gate
    else:
        grad_h_rG = _threshold_backward(grad_act_rF, act_rF, 0)
    torch.mm(grad_h_rG.t(), x_rS, out=grad_w_up_GS)
    if grad_x_rS is not None:
        torch.mm(grad_h_rG, w_up_GS, out=grad_x_rS)
    return grad_weight_r


class Experts(nn.Module):
    """E experts with stacked weights, applied to rows already sorted by expert."""

    # CPU: the mean rows per expert from which "blocked" beats "grouped". Measured (2 threads,
    # d_model 192, SMoE and MH-MoE h=3 forward + backward, docs/benchmarks.md): grouped is
    # 1.1-1.7x faster at 96-256 rows per expert, the two are within 10% at 384-512, blocked is
    # 1.3-1.9x faster at 768-2048.
    blocked_min_rows_per_expert: float = 768
    # "blocked": hidden pre-activations of all experts up to this size are saved for backward;
    # larger ones are recomputed there (see the module docstring).
    save_hidden_max_bytes: int = 48 * 2**20

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
        # A name in DISPATCH_BACKENDS, or None: chosen per call (``select_backend``).
        self.implementation: str | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default scale, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for name, param in self.named_parameters():
            bound = param.shape[-1] ** -0.5
            nn.init.uniform_(param, -bound, bound)

    def resolve_implementation(self, x: torch.Tensor, rows_per_expert: float | None = None) -> str:
        """The backend ``moe_dispatch`` runs these experts with (``select_backend``)."""
        return select_backend(self, x, rows_per_expert)

    def forward(
        self, x_MS: torch.Tensor, offsets_E: torch.Tensor, counts_E: list[int] | None = None
    ) -> torch.Tensor:
        """Apply expert e to its block of rows; ``offsets_E`` = int32 cumsum of rows per expert."""
        mm = functools.partial(
            grouped_mm, offsets_E=offsets_E, counts_E=counts_E, use_grouped_mm=self.use_grouped_mm
        )
        if self.activation == "swiglu":
            # Gate and up in one grouped matmul: (M, S) x (E, 2F, S) -> (M, 2F) = [gate | up].
            gate_MF, up_MF = mm(x_MS, fused_up_weight(self.w1, self.w3)).chunk(2, dim=1)
            hidden_MF = F.silu(gate_MF) * up_MF
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


def select_backend(experts: nn.Module, x: torch.Tensor, rows_per_expert: float | None = None) -> str:
    """The name of the backend ``moe_dispatch`` runs ``experts`` with, for input ``x``.

    ``experts.implementation`` when set; otherwise "grouped" for experts with their own forward,
    when ``use_grouped_mm`` is set explicitly (a choice of the grouped path's matmul), on GPUs,
    under ``torch.compile``, and on CPU when the experts get few rows each (``rows_per_expert``
    = assignments / experts below ``blocked_min_rows_per_expert``: there the blocked path's ~25
    small ops per expert cost more than the grouped path's large temporaries); "blocked" on CPU
    otherwise.
    """
    # The one guard for experts with their own math (BitExperts, TernaryExperts, any subclass
    # overriding forward): a backend reading the raw stacked weights would bypass it.
    own_math = type(experts).forward is not Experts.forward
    requested = getattr(experts, "implementation", None)
    if requested is not None:
        backend = DISPATCH_BACKENDS.get(requested)
        if backend is None:
            raise ValueError(
                f"implementation={requested!r}: must be one of {', '.join(DISPATCH_BACKENDS)} or None"
            )
        if own_math and backend.reads_raw_weights:
            allowed = ", ".join(n for n, b in DISPATCH_BACKENDS.items() if not b.reads_raw_weights)
            raise ValueError(
                f"implementation={requested!r}: reads the raw stacked weights and would bypass "
                f"the forward of {type(experts).__name__}; choose one of {allowed} or None"
            )
        return requested
    if own_math or experts.use_grouped_mm is not None or x.device.type != "cpu" \
            or torch.compiler.is_compiling():
        return "grouped"
    few_rows = rows_per_expert is not None and rows_per_expert < experts.blocked_min_rows_per_expert
    return "grouped" if few_rows else "blocked"
