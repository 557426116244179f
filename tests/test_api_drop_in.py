"""The README's "Drop-in use in someone else's VAE" snippet runs verbatim."""

import os
import re

import torch

SNIPPET = os.path.join(os.path.dirname(__file__), "..", "README.md")


def python_blocks(path):
    """The python code blocks of the README's drop-in section."""
    with open(path) as fh:
        text = fh.read()
    section = text.split("## Drop-in use in someone else's VAE", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_drop_in_snippet_runs_exactly():
    blocks = python_blocks(SNIPPET)
    assert len(blocks) == 1
    ns = {"__name__": "drop_in"}
    torch.manual_seed(0)
    exec(compile(blocks[0], SNIPPET, "exec"), ns)
    enc = ns["encoder"]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())
    for name in ("decoder", "nonlinear", "head_mu", "head_alpha"):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ns[name].parameters()), name
    assert torch.equal(ns["grad_scale"](ns["mu"], 0.3), ns["mu"])     # identity forward
