"""The one table of tensor dtypes: each torch dtype with its safetensors header name and, for
the float types a config can ask for, the name configs and ``config.json`` use ("bfloat16").

Every other place (the safetensors reader and writer, ``dtype:``/``out_dtype:`` in configs,
``convert --dtype``, the ``dtype`` written to ``config.json``) looks names up here.
"""

from __future__ import annotations

import torch

__all__ = ["SAFETENSORS_DTYPES", "SAFETENSORS_NAMES", "CONFIG_DTYPES", "CONFIG_NAMES"]

# (torch dtype, safetensors name, config name or None). Config names come in the order
# validation messages list them.
_TABLE: tuple[tuple[torch.dtype, str, str | None], ...] = (
    (torch.float32, "F32", "float32"),
    (torch.float16, "F16", "float16"),
    (torch.bfloat16, "BF16", "bfloat16"),
    (torch.float64, "F64", "float64"),
    (torch.int64, "I64", None),
    (torch.int32, "I32", None),
    (torch.int16, "I16", None),
    (torch.int8, "I8", None),
    (torch.uint8, "U8", None),
    (torch.bool, "BOOL", None),
    (torch.float8_e4m3fn, "F8_E4M3", None),
    (torch.float8_e5m2, "F8_E5M2", None),
)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name, _ in _TABLE}
"""Safetensors header name ("BF16") -> torch dtype."""

SAFETENSORS_NAMES: dict[torch.dtype, str] = {dtype: name for dtype, name, _ in _TABLE}
"""torch dtype -> safetensors header name."""

CONFIG_DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, _, name in _TABLE if name is not None}
"""Config name ("bfloat16") -> torch dtype, for the float types configs may name."""

CONFIG_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in CONFIG_DTYPES.items()}
"""torch dtype -> config name; float types without one (float8) are absent."""
