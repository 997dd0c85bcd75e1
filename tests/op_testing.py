"""What the op tests share: devices and dtypes, output poisoning, scattered block tables."""
import math

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA GPU")]),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def poison(t: torch.Tensor) -> torch.Tensor:
    """NaN everywhere, so an output element the kernel never wrote fails the comparison."""
    return t.fill_(float("nan"))


def random_block_tables(lengths, block_size, num_blocks, device):
    """Block tables whose blocks are scattered over the pool (unused entries 0, never read)."""
    max_blocks = max(math.ceil(n / block_size) for n in lengths) + 1
    perm = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(lengths), max_blocks, dtype=torch.int32)
    for b, n in enumerate(lengths):
        for i in range(math.ceil(n / block_size)):
            tables[b, i] = perm.pop()
    return tables.to(device)
