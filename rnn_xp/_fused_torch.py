"""torch's fast path: the in-place loops of `_fused_numpy`, run through `_TorchOps`.

torch has no loops of its own. `_TorchOps` gives it the NumPy signatures that
those loops call (``out=`` included), and `ops` hands it to them only when
autograd records none of the arrays: in-place writes would cut its graph. A
recorded forward or backward (a gradient penalty's, say) raises
NotImplementedError, and autograd then records the generic loop of `_scan`.

Where torch does better its own way, `_TorchOps` says so: the recurrent product
is added inside the matrix product (``addmm``, BLAS's beta = 1), which saves a
pass over the output. The loops themselves work on column blocks rather than
gate-major copies on torch (`_fused_numpy._gate_major_pays`), and fuse the
Elman backward too (`_fused_numpy._fused_backward_pays`).

torch itself is imported only when `ops` is called.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any


def ops(arrays) -> _TorchOps:
    """`_TorchOps` on the device of ``arrays[0]``; None entries of ``arrays`` are skipped.

    NotImplementedError when autograd is recording any of ``arrays``.
    """
    import torch

    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in arrays):
        raise NotImplementedError
    return _TorchOps(torch, arrays[0].device)


class _TorchOps:
    """The NumPy functions the fused loops use, with NumPy's signatures, on torch."""

    def __init__(self, torch: ModuleType, device: Any) -> None:
        self.matmul, self.add, self.multiply = torch.matmul, torch.add, torch.mul
        self.subtract, self.tanh, self.copy = torch.sub, torch.tanh, torch.clone
        self.addmm = torch.addmm
        self._torch, self._device = torch, device

    def empty(self, shape, dtype):
        return self._torch.empty(shape, dtype=dtype, device=self._device)

    def maximum(self, a, value, out):
        return self._torch.clamp_min(a, value, out=out)

    def copyto(self, dst, src) -> None:
        dst.copy_(src) if isinstance(src, self._torch.Tensor) else dst.fill_(src)

    @staticmethod
    def transpose(a, axes):
        return a.permute(axes)

    # -- where torch differs from NumPy: the helpers of `_fused_numpy` call these

    def plus_product(self, out, c, a, b) -> None:
        """``out <- c + a @ b`` in one ``addmm`` (``out`` may be ``c``): no scratch needed."""
        if out is c:
            out.addmm_(a, b)
        else:
            self.addmm(c, a, b, out=out)

    @staticmethod
    def blas_operand(a):
        """The 2-D ``a`` itself when it is C- or F-contiguous, else a contiguous copy."""
        return a if a.is_contiguous() or a.T.is_contiguous() else a.contiguous()

    def contiguous_copy(self, a):
        """A C-contiguous copy of ``a``, whatever its strides."""
        return a.clone(memory_format=self._torch.contiguous_format)
