"""A few rows of a decoder layer's attention, without the full ``N x N`` matrix.

Every attention-based scorer needs the post-softmax attention of a handful of query rows (the text
raters, the last prompt token) over all keys of one layer. The modeling code never materialises it
under sdpa or flash-attention, so we recompute exactly those rows from the layer's own inputs: the
normed hidden states the attention module received, its ``q_proj`` (and per-head ``q_norm`` if it has one), the RoPE ``cos``/``sin`` it was
given, and the keys it just wrote to the cache. Memory is ``O(heads x rows x N)``.

The result equals ``output_attentions=True`` under eager attention (same scaling, causal and padding
mask, GQA grouping); the logits and the softmax are computed in float32 whatever the model dtype.
"""

from __future__ import annotations

import torch

from ._compat import rotate_half


def attention_rows(
    attn_module: torch.nn.Module,
    hidden_states: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    query_index: torch.Tensor,
    query_key_index: torch.Tensor,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities of some query rows of one batch row.

    Args:
        attn_module: the layer's attention module (``q_proj``, ``head_dim``, ``scaling``, GQA groups).
        hidden_states: ``(S, D)`` normed inputs the module received for this row (this forward only).
        cos, sin: ``(S, head_dim)`` RoPE tables the module received for this row.
        keys: ``(H_kv, K, head_dim)`` the layer's cached keys for this row after the update (``K`` =
            physical cache length, including this forward's ``S`` tokens at the end).
        query_index: ``(R,)`` indices into this forward's tokens of the query rows.
        query_key_index: ``(R,)`` column of each query row's own key in ``keys`` (causality bound).
        key_valid: ``(K,)`` bool, False for padding columns.

    Returns:
        ``(H, R, K)`` float32 probabilities (``H``: the heads this process holds; under tensor parallelism its
        shard, which :class:`~sparse_cache.distributed.TensorParallel` gathers) (rows sum to 1 over the valid, causal columns).
    """
    head_dim = attn_module.head_dim
    num_kv = keys.shape[0]
    rows = query_index.numel()

    h = hidden_states.index_select(0, query_index)
    q = attn_module.q_proj(h)
    # this process's heads: all of them, or under tensor parallelism its shard (q_proj column-wise, keys alike)
    num_heads = q.shape[-1] // head_dim
    if num_heads * head_dim != q.shape[-1] or num_heads % num_kv:
        raise RuntimeError(
            f"attention rows: q_proj gives {q.shape[-1]} features ({head_dim} per head) for {num_kv} key heads; "
            "a head layout this package cannot score"
        )
    groups = num_heads // num_kv
    q = q.view(rows, num_heads, head_dim)
    q_norm = getattr(attn_module, "q_norm", None)  # a per-head norm before RoPE, as the module applies it
    if q_norm is not None:
        q = q_norm(q)
    q = q.transpose(0, 1)  # (H, R, d)
    c = cos.index_select(0, query_index).unsqueeze(0)
    s = sin.index_select(0, query_index).unsqueeze(0)
    q = (q * c + rotate_half(q) * s).float()

    # GQA without repeating keys: query head h uses key head h // groups.
    q = q.reshape(num_kv, groups * rows, head_dim)
    logits = torch.matmul(q, keys.float().transpose(1, 2)) * attn_module.scaling  # (H_kv, g*R, K)
    logits = logits.view(num_kv, groups, rows, -1)

    columns = torch.arange(keys.shape[1], device=keys.device)
    allowed = (columns[None, :] <= query_key_index[:, None]) & key_valid[None, :]  # (R, K)
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs.reshape(num_heads, rows, -1)
