"""safetensors dtype strings <-> torch dtypes."""
from __future__ import annotations

import torch

ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        ST_TO_TORCH[_name] = getattr(torch, _attr)
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}

ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in ST_TO_TORCH.items()}
FLOAT_ST = {k for k, v in ST_TO_TORCH.items() if v.is_floating_point}

# CLI spellings of the output dtype.
OUTPUT_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32", "keep": None}


def is_float(st: str) -> bool:
    return st in FLOAT_ST
