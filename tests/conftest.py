"""Shared fixtures: every test gets its own LISA_RT_HOME (never the user's cache); the op tests
take `device` (cpu, and cuda where a GPU is) and `dtype`."""
import pytest

from tests.op_testing import DEVICES, DTYPES


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).split(".")[-1])
def dtype(request):
    return request.param


@pytest.fixture(autouse=True)
def lisa_home(tmp_path, monkeypatch):
    home = tmp_path / "lisa-home"
    monkeypatch.setenv("LISA_RT_HOME", str(home))
    return home
