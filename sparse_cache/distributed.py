"""Tensor parallelism: every rank of a TP group scores the same tokens and keeps the identical set.

Under ``from_pretrained(..., tp_plan="auto")`` launched by ``torchrun``, transformers shards the attention's
``q_proj``/``k_proj``/``v_proj`` column-wise (each rank holds a contiguous block of heads, in rank order) and
``o_proj`` row-wise; the hidden states between layers are replicated. Each rank's KV cache therefore holds only
its own key/value heads, and a scorer run as is would see only those: head-averaged scores would differ per rank,
each rank would keep a different set, and the sharded caches would no longer describe the same tokens.

What this module makes exact (``TensorParallel``, one per cache when the model is tensor-parallel):

- attention rows: each rank computes its local heads' probabilities for the few query rows a scorer asks for,
  then they are all-gathered in rank order, so every scorer (head means, SparseVLM+'s ranking of heads, the
  adaptive budget's rater attention) sees the global ``(H, R, K)`` rows of the single-process run;
- per-head sums over the cache's keys (DART's key norms): all-reduced when the key heads are sharded;
- embedding-only scorers read the decoder input embeddings, which are replicated (the sharded embedding's output
  is all-reduced before the decoder); random scorers draw from the cache's ``seed``, the same on every rank;
- then every rank adopts rank 0's scores (and rater attention) with one broadcast, so that floating-point
  differences between devices can never split the group; compaction acts on each rank's local heads;
- after each prefill's selection, :meth:`TensorParallel.check_agreement` all-gathers a 64-bit digest of the kept
  positions and the cache layout and raises on any difference (``mode="pre-llm"``: also right after the selection,
  before the sharded language model runs on the cut).

Refused with a clear error: sequence parallelism (a rank would not hold every token's hidden state), pipeline or
FSDP dimensions of the device mesh, fused/packed q-k-v projections, and head counts not split evenly.
"""

from __future__ import annotations

import hashlib
import logging

import torch

logger = logging.getLogger(__name__)

#: plan styles of the attention projections this package can score (heads split in contiguous rank-order blocks,
#: or not split at all)
_SCORABLE_STYLES = {
    "q_proj": {"colwise", "local_colwise", "colwise_rep", "replicate"},
    "k_proj": {"colwise", "local_colwise", "colwise_rep", "replicate"},
    "v_proj": {"colwise", "local_colwise", "colwise_rep", "replicate"},
    "o_proj": {"rowwise", "local_rowwise", "rowwise_rep", "replicate"},
}


def _tp_size(model) -> int:
    size = getattr(model, "_tp_size", None)
    if size is None:
        try:
            size = getattr(model, "tp_size", None)
        except Exception:  # noqa: BLE001 - a property that raises means no TP
            size = None
    return int(size) if size else 1


def _tp_mesh(model, size: int):
    """The device mesh's ``tp`` dimension (transformers >= 5.2x: a named ``(pp, fsdp, tp)`` mesh; 5.14: 1-D)."""
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        mesh = getattr(model, "device_mesh", None)
    if mesh is None:
        raise ValueError(
            f"model: tensor-parallel (tp_size={size}) but no device mesh found on it (model._device_mesh); load it "
            "with from_pretrained(..., tp_plan='auto') under torchrun"
        )
    names = tuple(mesh.mesh_dim_names or ())
    if names and "tp" in names:
        for name, extent in zip(names, mesh.shape):
            if name != "tp" and extent > 1:
                raise ValueError(
                    f"model: its device mesh has {name}={extent}; PrunableDynamicCache supports tensor parallelism "
                    f"only (mesh {dict(zip(names, mesh.shape))}): pipeline and FSDP dimensions must be 1"
                )
        return mesh["tp"]
    if mesh.ndim != 1:
        raise ValueError(
            f"model: a {mesh.ndim}-D device mesh without a 'tp' dimension ({mesh}); PrunableDynamicCache supports a "
            "1-D tensor-parallel mesh or a named one with a 'tp' dimension"
        )
    return mesh


def _check_plan(plan: dict) -> None:
    """Refuse layouts the package cannot score (sequence parallelism, fused or unknown attention sharding)."""
    for key, style in (plan or {}).items():
        style = str(style)
        if "sequence_parallel" in style:
            raise ValueError(
                f"model: its tensor-parallel plan shards {key!r} with {style!r} (sequence parallelism): each rank "
                "would hold only part of the tokens, which a visual-token scorer cannot rank; load the model "
                "without sequence parallelism (tp_plan='auto' for the families this package supports)"
            )
        leaf = key.rsplit(".", 1)[-1]
        if ".self_attn." not in key and not key.endswith("self_attn"):
            continue
        if leaf in _SCORABLE_STYLES:
            if style not in _SCORABLE_STYLES[leaf]:
                raise ValueError(
                    f"model: its tensor-parallel plan shards {key!r} with {style!r}; PrunableDynamicCache scores "
                    f"attention sharded as {leaf}: one of {sorted(_SCORABLE_STYLES[leaf])}"
                )
        elif "proj" in leaf and style not in ("replicate",):
            raise ValueError(
                f"model: its tensor-parallel plan shards the attention projection {key!r} ({style!r}); "
                "PrunableDynamicCache scores attention with separate q_proj/k_proj/v_proj/o_proj only"
            )


def tensor_parallel_of(model) -> TensorParallel | None:
    """The TP group of a model loaded with ``tp_plan`` (``None`` for a model on one process or ``tp_size`` 1)."""
    size = _tp_size(model)
    if size <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"model: tensor-parallel (tp_size={size}) but torch.distributed is not initialized in this process"
        )
    _check_plan(getattr(model, "_tp_plan", None) or {})
    mesh = _tp_mesh(model, size)
    group = mesh.get_group()
    if dist.get_world_size(group) != size:
        raise ValueError(f"model: tp_size={size} but its tensor-parallel group has {dist.get_world_size(group)} ranks")
    return TensorParallel(group)


class TensorParallel:
    """Collectives of one cache over the model's tensor-parallel group (every rank calls them in the same order).

    ``share_scores``: whether every rank adopts rank 0's scores (default); the tests switch it off to check that
    each rank's own computation already agrees.
    """

    def __init__(self, group):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.source = dist.get_global_rank(group, 0)
        backend = str(dist.get_backend(group)).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        self.share_scores = True

    def __repr__(self) -> str:
        return f"TensorParallel(rank={self.rank}, size={self.size}, device={self.device})"

    # ------------------------------------------------------------------ scoring

    def gather_heads(self, local: torch.Tensor, total_heads: int) -> torch.Tensor:
        """``(H, ...)`` from each rank's ``(H_local, ...)`` block of heads (rank order = head order).

        Unsharded attention (``H_local == H``, e.g. a plan that shards only the MLP) is returned as is.
        """
        heads = local.shape[0]
        if heads == total_heads:
            return local
        if heads * self.size != total_heads:
            raise RuntimeError(
                f"tensor parallelism: this rank holds {heads} of the model's {total_heads} attention heads over "
                f"{self.size} ranks; PrunableDynamicCache scores heads split evenly in contiguous blocks only"
            )
        buffer = local.to(self.device).contiguous()
        parts = [torch.empty_like(buffer) for _ in range(self.size)]
        self.dist.all_gather(parts, buffer, group=self.group)
        return torch.cat(parts, dim=0).to(local.device)

    def sum_heads(self, partial: torch.Tensor, local_heads: int, total_heads: int) -> torch.Tensor:
        """A sum over heads from each rank's sum over its local heads (all-reduce); as is if heads are not split."""
        if local_heads == total_heads:
            return partial
        if local_heads * self.size != total_heads:
            raise RuntimeError(
                f"tensor parallelism: this rank holds {local_heads} of the model's {total_heads} key/value heads "
                f"over {self.size} ranks; PrunableDynamicCache scores heads split evenly only"
            )
        buffer = partial.to(self.device, torch.float32).contiguous()
        self.dist.all_reduce(buffer, group=self.group)
        return buffer.to(partial.device, partial.dtype)

    def _check_same(self, values: list[int], what: str) -> None:
        """Raise unless every rank holds the same ``values`` (one all-gathered 64-bit digest)."""
        seen = self._gather_digest(_digest([torch.tensor(values, dtype=torch.int64)]))
        if any(s != seen[0] for s in seen):
            raise RuntimeError(
                f"tensor parallelism: the ranks disagree on {what} (this rank, {self.rank}: {values}); every rank "
                "of the group must run the same call with the same inputs"
            )

    def _gather_digest(self, value: int) -> list[int]:
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        self.dist.all_gather(parts, mine, group=self.group)
        return [int(p.item()) for p in parts]

    def agree_on_scores(self, scores: list, extras: dict) -> list:
        """Every rank adopts rank 0's scores (and the rater attention of the adaptive budget): one broadcast."""
        if not self.share_scores:
            return scores
        attention = extras.get("rater_attention", {})
        tensors = [s for s in scores if s is not None] + [attention[row] for row in sorted(attention)]
        layout = [len(scores)] + [-1 if s is None else s.numel() for s in scores]
        layout += [v for row in sorted(attention) for v in (row, *attention[row].shape)]
        self._check_same(layout, "which rows have scores and their sizes")
        if not tensors:
            return scores
        flat = torch.cat([t.reshape(-1).to(self.device, torch.float32) for t in tensors])
        self.dist.broadcast(flat, src=self.source, group=self.group)
        pieces = iter(flat.split([t.numel() for t in tensors]))
        shared = [None if s is None else next(pieces).to(s.device, s.dtype).view(s.shape) for s in scores]
        for row in sorted(attention):
            old = attention[row]
            attention[row] = next(pieces).to(old.device, old.dtype).view(old.shape)
        return shared

    # ------------------------------------------------------------------ verification

    def check_agreement(self, cache) -> None:
        """Raise unless every rank's cache kept the same visual tokens and holds the same layout (a 64-bit digest)."""
        tensors = list(cache.kept_visual_positions or [])
        positions = getattr(cache, "_prefix_positions", None)
        if isinstance(positions, torch.Tensor):
            tensors.append(positions)
        tensors.append(torch.tensor([cache.get_seq_length()]))
        seen = self._gather_digest(_digest(tensors))
        if any(s != seen[0] for s in seen):
            kept = [int(k.numel()) for k in cache.kept_visual_positions or []]
            raise RuntimeError(
                f"tensor parallelism: rank {self.rank} kept a different set of visual tokens than another rank "
                f"(digests per rank {[f'{s & (2**64 - 1):016x}' for s in seen]}; this rank kept {kept} per row); the "
                "sharded KV caches no longer describe the same tokens. Every rank must run the same call on the "
                "same inputs with the same cache arguments."
            )
        logger.debug("tensor parallelism: %d ranks kept the same visual tokens (digest %016x)", self.size,
                     seen[0] & (2**64 - 1))


def _digest(tensors: list[torch.Tensor]) -> int:
    """A 64-bit digest of integer tensors (their sizes and values)."""
    digest = hashlib.blake2b(digest_size=8)
    for tensor in tensors:
        values = tensor.detach().to("cpu", torch.int64).contiguous()
        digest.update(str(tuple(values.shape)).encode())
        digest.update(values.numpy().tobytes())
    return int.from_bytes(digest.digest(), "little", signed=True)
