"""csrc/dawson_table.h: the node values of Dawson's integral D and of F = int D that the C++ host
path of the exact log term expands around, checked against special.py (itself checked against
30-digit quadrature in test_exact_heads.py)."""

import os
import re

import torch

from silent_kernels.special import dawson, dawson_integral

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc", "dawson_table.h")


def _array(text: str, name: str) -> torch.Tensor:
    body = re.search(rf"{name}\[kDawsonNodes\] = \{{(.*?)\}};", text, re.S).group(1)
    return torch.tensor([float(v) for v in body.replace("\n", " ").split(",") if v.strip()], dtype=torch.float64)


def test_node_values_match_the_reference_special_functions():
    text = open(HEADER).read()
    nodes = int(re.search(r"kDawsonNodes = (\d+);", text).group(1))
    step = float(re.search(r"kDawsonNodeStep = ([0-9.]+);", text).group(1))
    x = torch.arange(nodes, dtype=torch.float64) * step
    assert nodes * step > 6.0                   # covers the series range x < 6 of special.py
    for name, fn in (("kDawsonAtNode", dawson), ("kDawsonIntegralAtNode", dawson_integral)):
        got, want = _array(text, name), fn(x)
        assert got.shape == want.shape
        assert ((got - want).abs() <= 2e-15 * want.abs()).all(), name   # special.py: ~1e-15
