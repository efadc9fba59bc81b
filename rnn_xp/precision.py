"""Precision: mixed-precision policies, and float32 matrix products on GPUs (IEEE or TF32).

Mixed precision
---------------
A policy makes the matrix products of a model read half-precision operands
while everything else stays float32 (Lightning's and Keras' idea)::

    model = rnn_xp.Recurrent("lstm", D, H, like=x, precision="bf16-mixed")
    out, (h_n, c_n) = model(x)          # out bfloat16; h_n, c_n float32
    out, h_n = model(x, precision="16-mixed")   # or for one call

===============  ==========  ==========  ==========================================
policy           operands    output      libraries
===============  ==========  ==========  ==========================================
``bf16-mixed``   bfloat16    bfloat16    torch (CPU, CUDA), JAX
``16-mixed``     float16     float16     torch, JAX, CuPy, NumPy (float16 storage)
===============  ==========  ==========  ==========================================

Under either, the parameters are float32 (the master copy: gradients, the
optimizer and saved files see float32), and so are the recurrent state (h, and
always c), the gates' elementwise work and every reduction of the gradients.
Products accumulate in float32 where the library can (see `rnn_xp._mixed` for
each library's product); a library that cannot run a policy raises. float16's
range is narrow: train under ``16-mixed`` with `rnn_xp.optim.LossScaler`.
``Policy(name, output="float32")`` returns float32 outputs instead.

Float32 matrix products on NVIDIA GPUs: IEEE float32, or TF32 by choice
-----------------------------------------------------------------------

Since Ampere, NVIDIA GPUs can run float32 matrix products on tensor cores in
TF32, which keeps float32's range but rounds the operands to 10 mantissa bits
(about 1e-3 relative), several times faster. Each library has its own default,
and some differ by path:

* torch: cuBLAS matrix products are IEEE float32 unless set otherwise (NVIDIA's
  containers set ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1``), but cuDNN's RNNs,
  which ``torch.nn.LSTM`` uses, run in TF32 by default;
* JAX: matrix products on GPU default to reduced precision;
* CuPy: IEEE float32, unless ``CUPY_TF32=1`` was set.

rnn_xp's own backends (`rnn_xp._backends`: the test matrix, ``rnn-xp run``,
``rnn-xp check``) pin IEEE float32, so that a GPU result agrees with NumPy to
float32's own tolerance. Opt into TF32 for speed, or back out, with::

    from rnn_xp import precision
    with precision.float32_matmul("tf32"):      # every library already imported
        out, h_n = model.forward(xs)
    precision.set_float32_matmul("ieee", "torch")  # from now on, torch only

``NVIDIA_TF32_OVERRIDE=0`` in the environment turns TF32 off in every NVIDIA
library, whatever is set here. On CPUs these settings change nothing.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._imports import import_library

__all__ = [
    "LIBRARIES",
    "MODES",
    "POLICIES",
    "Policy",
    "float32_matmul",
    "get_float32_matmul",
    "policy",
    "set_float32_matmul",
]

POLICIES = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}
"""Each mixed policy by name, and the format its products read."""
_ALIASES = {"mixed_bfloat16": "bf16-mixed", "mixed_float16": "16-mixed"}  # Keras' names
_NONE = ("32-true", "32", None)  # no policy: compute in the model's dtype, as without one
_OUTPUTS = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Policy:
    """A mixed-precision policy: products read ``operand`` numbers, the rest is float32.

    Parameters
    ----------
    name : {'bf16-mixed', '16-mixed'}
        Lightning's names; Keras' ``'mixed_bfloat16'`` and ``'mixed_float16'``
        are accepted too.
    output : {'bfloat16', 'float16', 'float32'}, optional
        The dtype of the forward's ``out``; the policy's format by default.
        The final states are float32 whatever it is.
    """

    name: str
    output: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ValueError(
                f"precision: expected a policy name such as 'bf16-mixed', got "
                f"{type(self.name).__name__}"
            )
        name = _ALIASES.get(str(self.name), str(self.name))
        if name not in POLICIES:
            raise ValueError(
                f"precision: expected one of {', '.join(map(repr, POLICIES))} (or '32-true' "
                f"or None for none), got {self.name!r}"
            )
        object.__setattr__(self, "name", name)
        output = self.output or POLICIES[name]
        if not isinstance(output, str) or output not in _OUTPUTS:
            raise ValueError(
                f"output: expected one of {', '.join(map(repr, _OUTPUTS))}, got {self.output!r}"
            )
        object.__setattr__(self, "output", str(output))

    @property
    def operand(self) -> str:
        """The dtype the matrix products read: 'bfloat16' or 'float16'."""
        return POLICIES[self.name]

    compute = "float32"  # parameters, state, elementwise work, reductions


def policy(spec: Policy | str | None) -> Policy | None:
    """The `Policy` that ``spec`` names, or None for none (None, '32-true', '32')."""
    if isinstance(spec, Policy):
        return spec
    if spec is None or (isinstance(spec, str) and spec in _NONE):
        return None
    if not isinstance(spec, str):
        raise ValueError(
            f"precision: expected a policy name such as 'bf16-mixed', a Policy or None, got "
            f"{type(spec).__name__}"
        )
    return Policy(spec)


MODES = ("ieee", "tf32")
LIBRARIES = ("torch", "jax", "cupy")


class _Torch:
    """cuBLAS products and cuDNN (convolutions and RNNs), in both of torch's APIs.

    torch 2.9 added per-operator ``fp32_precision`` flags beside the older
    ``allow_tf32`` ones, and raises when code reads an old flag that the new
    ones contradict. Each is set here, the old first (setting it resets the
    new ones), so that code using either API reads what rnn_xp set.
    """

    @staticmethod
    def raw(torch: Any) -> Any:
        b = torch.backends
        try:
            cudnn = b.cudnn.allow_tf32
        except RuntimeError:  # the two APIs already disagree: leave the old flag alone
            cudnn = None
        if not hasattr(b.cuda.matmul, "fp32_precision"):  # pragma: no cover - torch < 2.9
            return (torch.get_float32_matmul_precision(), None, cudnn, None, None)
        return (
            torch.get_float32_matmul_precision(),
            b.cuda.matmul.fp32_precision,
            cudnn,
            b.cudnn.conv.fp32_precision,
            b.cudnn.rnn.fp32_precision,
        )

    @staticmethod
    def apply(torch: Any, raw: Any) -> None:
        b = torch.backends
        matmul, matmul_new, cudnn, conv, rnn = raw
        torch.set_float32_matmul_precision(matmul)
        if cudnn is not None:
            b.cudnn.allow_tf32 = cudnn
        if matmul_new is not None:
            b.cuda.matmul.fp32_precision = matmul_new
            b.cudnn.conv.fp32_precision = conv
            b.cudnn.rnn.fp32_precision = rnn

    @staticmethod
    def of(mode: str) -> Any:
        tf32 = mode == "tf32"
        return ("high" if tf32 else "highest", mode, tf32, mode, mode)

    @staticmethod
    def report(raw: Any) -> str:
        matmul, matmul_new, cudnn, _, rnn = raw
        if matmul_new in (None, "none"):
            matmul_new = "ieee" if matmul == "highest" else "tf32"
        if rnn in (None, "none"):
            rnn = "unknown" if cudnn is None else "tf32" if cudnn else "ieee"
        return matmul_new if matmul_new == rnn else f"{matmul_new} (cuBLAS), {rnn} (cuDNN RNN)"


_JAX_NAMES = {"highest": "ieee", "float32": "ieee", "tensorfloat32": "tf32", "high": "tf32"}


class _Jax:
    @staticmethod
    def raw(jax: Any) -> Any:
        """The process-wide value, under any ``jax.default_matmul_precision`` block."""
        holder = getattr(jax.config, "_value_holders", {}).get("jax_default_matmul_precision")
        if hasattr(holder, "get_global"):
            return holder.get_global()
        return jax.config.jax_default_matmul_precision  # pragma: no cover - other JAX

    @staticmethod
    def effective(jax: Any) -> Any:
        """The value in force in this thread."""
        return jax.config.jax_default_matmul_precision

    @staticmethod
    def apply(jax: Any, raw: Any) -> None:
        jax.config.update("jax_default_matmul_precision", raw)

    @staticmethod
    def of(mode: str) -> Any:
        return {"ieee": "highest", "tf32": "tensorfloat32"}[mode]

    @staticmethod
    def report(raw: Any) -> str:
        return "default" if raw is None else _JAX_NAMES.get(raw, str(raw))


class _Cupy:
    # CuPy reads CUPY_TF32 once, at its first float32 product; the compute
    # type can be set at run time only through this module of its core.
    @staticmethod
    def _linalg() -> Any:
        from cupy._core import _routines_linalg

        return _routines_linalg

    @classmethod
    def raw(cls, cupy: Any) -> Any:
        import numpy as np

        return cls._linalg().get_compute_type(np.float32)

    @classmethod
    def apply(cls, cupy: Any, raw: Any) -> None:
        import numpy as np

        cls._linalg().set_compute_type(np.float32, raw)

    @classmethod
    def of(cls, mode: str) -> Any:
        linalg = cls._linalg()
        return linalg.COMPUTE_TYPE_TF32 if mode == "tf32" else linalg.COMPUTE_TYPE_DEFAULT

    @classmethod
    def report(cls, raw: Any) -> str:
        return "tf32" if raw == cls._linalg().COMPUTE_TYPE_TF32 else "ieee"


_KNOBS = {"torch": _Torch, "jax": _Jax, "cupy": _Cupy}


def _libraries(libraries: tuple[str, ...]) -> dict[str, Any]:
    """The named libraries, imported; with no names, those the process has imported."""
    unknown = [name for name in libraries if name not in LIBRARIES]
    if unknown:
        raise ValueError(
            f"libraries: expected some of {', '.join(LIBRARIES)}, got {', '.join(unknown)}"
        )
    if not libraries:
        return {name: sys.modules[name] for name in LIBRARIES if name in sys.modules}
    what = {"torch": "PyTorch", "jax": "JAX", "cupy": "CuPy"}
    return {name: import_library(name, what[name]) for name in libraries}


def get_float32_matmul(*libraries: str) -> dict[str, str]:
    """The float32 matrix-product mode of each library: ``'ieee'``, ``'tf32'`` or its default.

    With no names: every library of `LIBRARIES` the process has imported.
    torch reports cuBLAS and cuDNN's RNNs separately when they differ, as its
    defaults do (IEEE for cuBLAS, TF32 for cuDNN's RNNs); JAX reports the
    mode in force in this thread.
    """
    return {name: _report(name, module) for name, module in _libraries(libraries).items()}


def _report(name: str, module: Any) -> str:
    knob = _KNOBS[name]
    return knob.report(getattr(knob, "effective", knob.raw)(module))


def set_float32_matmul(mode: str, *libraries: str) -> dict[str, str]:
    """Make float32 matrix products IEEE (``'ieee'``) or TF32 (``'tf32'``); the old modes.

    ``libraries`` are names from `LIBRARIES`; with none, every one of them the
    process has imported (a library imported later keeps its own default: name
    it to import it now). The call changes process-wide settings of those
    libraries and returns what they were, as `get_float32_matmul` reports them.
    """
    modules = _libraries(libraries)
    reports = {name: _report(name, module) for name, module in modules.items()}
    _set(mode, libraries)
    return reports


def _set(mode: str, libraries: tuple[str, ...]) -> dict[str, tuple[Any, Any]]:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(map(repr, MODES))}, got {mode!r}")
    modules = _libraries(libraries)
    before = {name: (module, _KNOBS[name].raw(module)) for name, module in modules.items()}
    for name, module in modules.items():
        _KNOBS[name].apply(module, _KNOBS[name].of(mode))
    jax = modules.get("jax")
    if jax is not None and _Jax.effective(jax) != _Jax.of(mode):
        _KNOBS["jax"].apply(jax, before["jax"][1])
        raise ValueError(
            "libraries: JAX's matmul precision is held for this thread by "
            "jax.default_matmul_precision(...), which a process-wide setting cannot change; "
            "use rnn_xp.precision.float32_matmul inside it"
        )
    return before


@contextlib.contextmanager
def float32_matmul(mode: str, *libraries: str) -> Iterator[dict[str, str]]:
    """`set_float32_matmul` for the ``with`` block only: each setting comes back after it.

    For JAX this is ``jax.default_matmul_precision``, which holds in this
    thread; torch's and CuPy's flags are process-wide.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(map(repr, MODES))}, got {mode!r}")
    modules = _libraries(libraries)
    with contextlib.ExitStack() as stack:
        before = {}
        for name, module in modules.items():
            knob = _KNOBS[name]
            raw = knob.raw(module)
            before[name] = _report(name, module)
            if name == "jax":
                stack.enter_context(module.default_matmul_precision(knob.of(mode)))
            else:
                stack.callback(knob.apply, module, raw)
                knob.apply(module, knob.of(mode))
        yield before
