"""Fixtures shared by the op tests: `device` (cpu, and cuda where a GPU is) and `dtype`."""
import pytest

from tests.op_testing import DEVICES, DTYPES


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).split(".")[-1])
def dtype(request):
    return request.param
