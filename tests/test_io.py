"""The io package's shared pieces: the dtype table."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from relex_merge.io.dtypes import CONFIG_DTYPES, CONFIG_NAMES, SAFETENSORS_DTYPES, SAFETENSORS_NAMES


def test_config_dtype_names_come_from_the_table():
    from relex_merge.cli import main
    from relex_merge.config import DTYPES

    assert DTYPES == ("float32", "float16", "bfloat16", "float64") == tuple(CONFIG_DTYPES)
    convert = main.commands["convert"]
    choices = next(p for p in convert.params if p.name == "dtype").type.choices
    assert set(choices) - {"keep"} <= set(CONFIG_DTYPES)
    assert all(CONFIG_DTYPES[CONFIG_NAMES[dtype]] == dtype for dtype in CONFIG_NAMES)


@pytest.mark.parametrize("dtype", list(SAFETENSORS_NAMES), ids=str)
def test_safetensors_names_match_the_safetensors_library(dtype, tmp_path):
    save_file({"x": torch.zeros(2, dtype=dtype)}, tmp_path / "x.safetensors")
    raw = (tmp_path / "x.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    name = json.loads(raw[8 : 8 + length])["x"]["dtype"]
    assert SAFETENSORS_NAMES[dtype] == name
    assert SAFETENSORS_DTYPES[name] == dtype
