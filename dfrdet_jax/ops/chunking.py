"""Row chunks under ``jax.lax.map``: bounds the memory of a computation over P rows (points,
anchors) against N boxes to chunk_size * N instead of P * N (target assignment, matching)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_map(fn, inputs, pad_values, chunk_size: int | None):
    """``jax.lax.map(fn, ...)`` over row chunks of ``inputs``, to bound the memory of ``fn``.

    inputs: arrays sharing the leading size P, cut into ceil(P / c) chunks of c =
    min(chunk_size, P) rows (``None``: one chunk); the last chunk is padded with ``pad_values``
    (one per input). fn(*chunk) -> a pytree; returns that pytree with a leading chunk axis.
    """
    num = inputs[0].shape[0]
    chunk = num if chunk_size is None else min(chunk_size, num)
    num_chunks = -(-num // chunk)
    pad = num_chunks * chunk - num
    chunked = tuple(
        jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=value).reshape(
            (num_chunks, chunk) + x.shape[1:]
        )
        for x, value in zip(inputs, pad_values, strict=True)
    )
    if num_chunks == 1:
        return jax.tree.map(lambda v: v[None], fn(*(x[0] for x in chunked)))
    return jax.lax.map(lambda xs: fn(*xs), chunked)


def unchunk(tree, num: int):
    """A ``chunked_map`` result of row-wise outputs [num_chunks, c, ...] -> its first ``num``
    rows [num, ...], the padding cut off."""
    return jax.tree.map(lambda v: v.reshape((-1,) + v.shape[2:])[:num], tree)


def map_in_chunks(fn, inputs, pad_values, chunk_size: int | None):
    """``fn(*inputs)`` for a row-wise ``fn`` (row i of every output depends on row i of the
    inputs only), computed ``chunk_size`` rows at a time; see ``chunked_map``."""
    return unchunk(chunked_map(fn, inputs, pad_values, chunk_size), inputs[0].shape[0])
