from __future__ import annotations

import pytest

from gantry.adapters.hub import check_relative_path
from gantry.errors import UnsafePathError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "name",
    ["../etc/passwd", "/abs", "a/../../b", "a//b", "./a", "a\\b", "C:/x", "", "a/\x00b", "a/.."],
)
def test_traversal_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafePathError):
        check_relative_path(name)


@pytest.mark.parametrize(
    "name",
    ["config.json", "onnx/model.onnx", "1_Pooling/config.json", "weird [1].json", "ünïcode.txt"],
)
def test_normal_names_pass(name: str) -> None:
    check_relative_path(name)
