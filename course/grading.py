"""Helpers for the notebooks' exercise checks and the autograder: library functions switched off while a
student's answer runs, and failure messages that say which case failed, what was expected and what came out.

    with grading.disabled((uft, "hint_fraction"), namespace=globals()):
        got = my_hint_fraction(1, 4)
    grading.expect_close(got, 0.8536, "my_hint_fraction(1, T_hint=4)")
"""
from __future__ import annotations

import contextlib
import math

# The pieces of uft.py / sft_go.py a course hands out; each has autograder tests named test_<piece>_...
PIECES = ["filter_top_k_top_p", "hint_fraction", "cut_points", "sample_hint", "group_advantages",
          "policy_gradient_loss", "kl_k3", "masked_nll", "rl_loss", "tfidf_scores", "top_eta_groups",
          "worst_group_loss"]


class Disabled(AssertionError):
    """Raised by a library function that an exercise must not call."""


def _refusal(label: str):
    def refuse(*args, **kwargs):
        raise Disabled(f"{label} is switched off during this check: the exercise asks you to write it "
                       "yourself, not to call it")
    return refuse


@contextlib.contextmanager
def disabled(*targets: tuple[object, str], namespace: dict | None = None):
    """Within the block, each (owner, attribute) - e.g. (uft, "hint_fraction"), (model, "generate") - raises
    `Disabled` when called. Names in `namespace` (a notebook's globals()) bound to the same objects are
    switched off too, so `from uft import hint_fraction` does not get around it. Restored on exit."""
    saved, rebound = [], []
    for owner, name in targets:
        original = getattr(owner, name)
        label = f"{getattr(owner, '__name__', type(owner).__name__)}.{name}"
        saved.append((owner, name, original, name in vars(owner)))
        setattr(owner, name, _refusal(label))
        for key, value in list((namespace or {}).items()):
            if value is original:
                rebound.append((key, value))
                namespace[key] = _refusal(label)
    try:
        yield
    finally:
        for owner, name, original, own in reversed(saved):
            if own:
                setattr(owner, name, original)
            else:                                  # e.g. a method found on the class: drop the instance copy
                delattr(owner, name)
        for key, value in rebound:
            namespace[key] = value


def _as_float(x) -> float:
    return float(x.item() if hasattr(x, "item") and getattr(x, "numel", lambda: 1)() == 1 else x)


def expect_close(got, expected, case: str, tol: float = 1e-6) -> None:
    """Scalars (or tensors / arrays / lists of the same shape) equal to `tol`; the message names the case."""
    import torch

    g = torch.as_tensor(got, dtype=torch.float64) if not isinstance(got, torch.Tensor) else got.double()
    e = torch.as_tensor(expected, dtype=torch.float64)
    if g.shape != e.shape:
        raise AssertionError(f"{case}: expected shape {tuple(e.shape)}, got {tuple(g.shape)}")
    both_inf = torch.isinf(g) & torch.isinf(e) & (torch.sign(g) == torch.sign(e))
    bad = ~(both_inf | ((g - e).abs() <= tol * (1 + e.abs())))
    if bad.any():
        if g.numel() == 1:
            raise AssertionError(f"{case}: expected {_as_float(e):.6g}, got {_as_float(g):.6g}")
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{case}: {int(bad.sum())} of {g.numel()} values differ; first at {first}: "
                             f"expected {float(e[first]):.6g}, got {float(g[first]):.6g}\n"
                             f"expected {e.tolist()}\ngot      {g.tolist()}")


def expect_equal(got, expected, case: str) -> None:
    """Exact equality (ids, groups, lists, strings); tensors are compared as lists."""
    to_plain = (lambda x: x.tolist() if hasattr(x, "tolist") else x)
    if to_plain(got) != to_plain(expected):
        raise AssertionError(f"{case}:\nexpected {to_plain(expected)!r}\ngot      {to_plain(got)!r}")


def expect_true(condition: bool, case: str, why: str) -> None:
    """An invariant: the message says which property failed and why it must hold."""
    if not condition:
        raise AssertionError(f"{case}: {why}")


def isclose(a: float, b: float, tol: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
