"""The dtypes cogtune names, in one table: option values and mixed-precision settings."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype, sft.save_dtype
MIXED_PRECISION = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # what frozen weights train in
