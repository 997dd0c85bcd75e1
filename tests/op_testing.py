"""What the op tests share: the devices and dtypes every op runs on, and output poisoning."""
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
