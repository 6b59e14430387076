"""What the op tests share: float32 inputs, float64 torch leaves holding the same values, and the
error measure they are held to (max |error| relative to max |reference|)."""

from __future__ import annotations

from typing import Any

import numpy as np

try:
    import torch
except ImportError:  # test_cuda_ops needs no torch; the tests that do skip on their own importorskip
    torch: Any = None

# fp32 ops against float64 references: max |error| relative to max |reference|.
TOL = 1e-4


def f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def leaf(a) -> torch.Tensor:
    """A float64 leaf tensor holding exactly the float32 values the C op sees."""
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def close(got, want, what: str, tol: float = TOL, floor: float = 1e-6) -> None:
    """floor: the magnitude below which a reference counts as zero (a gradient
    that cancels exactly in float64 comes out as float32 rounding noise)."""
    got = np.asarray(got, dtype=np.float64)
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.abs(want).max(initial=0.0)), floor)
    err = float(np.abs(got - want).max(initial=0.0)) / scale
    assert err <= tol, f"{what}: max error {err:.2e} relative to max |reference| {scale:.2e}"


def grads(out: torch.Tensor, dout: np.ndarray, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, torch.tensor(np.asarray(dout, dtype=np.float64))))


def left_padding(B: int, T: int, pads: list[int]) -> np.ndarray:
    """(B, T) key validity with row b's first pads[b] positions masked."""
    valid = np.ones((B, T), dtype=np.uint8)
    for b, n in enumerate(pads):
        valid[b, :n] = 0
    return valid


def teacher_table(rng, N: int, V: int, K: int, sharp: float) -> tuple[np.ndarray, np.ndarray]:
    """What data/calculate_logits.py stores: the teacher's top-K probabilities
    and the remaining mass as fp16 (N, K+1), the top-K ids as int32 (N, K)."""
    t = rng.standard_normal((N, V)) * sharp
    p = np.exp(t - t.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    index = np.argsort(-p, axis=-1)[:, :K].astype(np.int32)
    top = np.take_along_axis(p, index, -1)
    probs = np.concatenate([top, 1.0 - top.sum(-1, keepdims=True)], -1).astype(np.float16)
    return probs, index
