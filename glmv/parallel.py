"""Tensor parallelism of the text decoder (and a data-parallel vision tower) over the ranks of a torch.distributed
group (NCCL on CUDA, gloo on CPU).

Megatron's split: per decoder layer q/k/v and gate/up are column-parallel (a rank holds num_heads / N query heads,
num_key_value_heads / N KV heads and intermediate_size / N MLP columns), o_proj and down_proj row-parallel, each
followed by one all-reduce of its partial sums: two collectives per layer. MoE layers (glmv.moe) split by expert
instead: every rank routes every token (the router is replicated and its inputs identical), runs the tokens sent to
its n_routed_experts / N experts and its share of the shared experts' columns, and the MLP's one all-reduce adds the
ranks' partial sums. The lm_head is vocab-split (vocab / N rows per rank, logits all-gathered) when the vocabulary
divides by N, replicated otherwise. A rank's KV cache holds its own KV heads only. Replicated on every rank: the
token embedding and the norms. FP8 releases are refused with tensor_parallel > 1 for now (their block scales would
need splitting on block boundaries).

The vision tower is whole on every rank but runs data-parallel: of the frames a pass packs together (an image is one
frame, a video several; the tower never mixes frames, so a share may end inside a video), each rank encodes one run
of consecutive frames holding about 1/N of their patches (`share`, computed alike on every rank from the grids,
which every rank has), and one all-gather padded to the largest share (`Group.gather_rows`) hands every rank all the
features in their order. Each frame is encoded once, by one rank, so its features are the same bits on every rank.
A pass of one image is encoded by one rank while the others wait (as they would for the largest share anyway).

Loading (glmv.weights) reads each rank's slices only, as views of the memory-mapped safetensors copied slice by
slice: a rank never holds a whole split tensor.

Rank coordination: every rank runs the same engine (glmv.engine) on the same inputs, in lockstep. The schedule
depends only on the inputs, the engine config and the tokens chosen; the tokens come from logits that are identical
on every rank (all-reduce and all-gather hand every rank the same bits: tests/test_tensor_parallel.py checks it on
gloo), and sampling draws from per-row seeds, not a global generator, so every rank chooses the same tokens, admits
the same rows at the same step and calls the same collectives in the same order. The replicated residual stream must
be the same bits on every rank too (else each rank's slice of the logits, or the whole logits of a replicated
lm_head, comes from a stream of its own): its inputs are token embeddings (a table lookup) and vision features
(gathered from the one rank that computed each: on CUDA some kernels are not bitwise deterministic, so ranks encoding
the same image could differ), so the ranks' input embeddings agree with no message of their own. Neither prefill nor
decode steps need a message beyond the model's own collectives, and the engine is unchanged; the alternative, rank 0
broadcasting each step's inputs, would put a host round trip in every decode step and a second code path in the
engine. The caller's side of the contract: every rank gets the same requests with the same seeds (generate's
seed=None draws them from torch's global generator: seed it alike on every rank), added at the same engine step.
`generate` (one batch, then run) meets it as is; the pipeline's model actor (pipeline/tp.py) has rank 0 decide when a
batch joins and tell the others before their next step, since batches arriving on a thread while the engine runs
would join at different steps on different ranks. The pool's size must agree too: a caller sizing kv_blocks from free
memory takes the smallest over the ranks.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn

from glmv.config import ConfigError, Glm4vConfig


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks that hold one model; world 1 (the default) makes every collective a
    no-op. process_group: a torch.distributed group, None for the default (initialised) one."""
    rank: int = 0
    world: int = 1
    process_group: object = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's t (in place)."""
        if self.world > 1:
            dist.all_reduce(t, group=self.process_group)
        return t

    def gather_rows(self, t: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(counts[rank], ...) per rank -> (sum(counts), ...) on every rank: the ranks' rows in rank order, each
        rank's as it sent them. Every rank passes the same counts (a rank with 0 rows joins too): each sends its rows
        padded to the largest count, one all_gather (NCCL's needs equal sizes, gloo's too)."""
        if t.shape[0] != counts[self.rank]:
            raise ValueError(f"rank {self.rank} has {t.shape[0]} rows to gather, counts say {counts[self.rank]}")
        most = max(counts)
        if self.world == 1 or most == 0:
            return t
        padded = t.new_zeros((most, *t.shape[1:]))  # (most, ...)
        padded[:t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.process_group)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """(..., n) per rank -> (..., world * n): the ranks' pieces side by side, rank order."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.process_group)
        return torch.cat(parts, dim=-1)


SINGLE = Group()


def share(sizes: list[int], world: int) -> list[range]:
    """Each rank's run of consecutive items (by index), balanced by size: item i goes to the rank whose 1/world of
    the sizes' sum holds the item's midpoint, so a rank's load is within one item of an even share. Contiguous
    rather than greedy (largest first to the least loaded): a rank's items are one slice of the packed input and its
    results one run of the output, so gathering them in rank order restores the items' order with no permutation.
    sizes: each item's size (> 0), the same on every rank, so every rank computes the same shares."""
    total, owner, before = sum(sizes), [], 0
    for size in sizes:
        owner.append((2 * before + size) * world // (2 * total))  # the midpoint's rank, in integers
        before += size
    bounds = [bisect.bisect_left(owner, r) for r in range(world + 1)]
    return [range(bounds[r], bounds[r + 1]) for r in range(world)]


@dataclass(frozen=True)
class Slice:
    """A rank's share of a checkpoint tensor along `dim`: the tensor is `chunks` equal parts side by side along dim
    (2 for the fused [gate; up] weight, else 1), and the rank takes its 1/world of each."""
    dim: int
    rank: int
    world: int
    chunks: int = 1

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        out = list(full)
        out[self.dim] //= self.world
        return tuple(out)

    def full(self, part: tuple[int, ...]) -> tuple[int, ...]:
        """The whole tensor's shape, from a rank's share of it."""
        out = list(part)
        out[self.dim] *= self.world
        return tuple(out)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The rank's slice of t, as a view where it is one piece (no copy of a memory-mapped tensor)."""
        parts = []
        for part in t.chunk(self.chunks, self.dim):
            n = part.shape[self.dim] // self.world
            parts.append(part.narrow(self.dim, self.rank * n, n))
        return parts[0] if len(parts) == 1 else torch.cat(parts, self.dim)


def check(config: Glm4vConfig, world: int) -> None:
    """Refuse, naming the numbers, a model that `world` ranks cannot split evenly."""
    if world == 1:
        return
    text, moe = config.text, config.text.moe
    counts = {"num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
              "intermediate_size": text.intermediate_size}
    if moe is not None:
        counts.update({"n_routed_experts": moe.n_routed_experts,
                       "moe_intermediate_size * n_shared_experts": moe.moe_intermediate_size * moe.n_shared_experts})
    for what, n in counts.items():
        if n % world:
            raise ConfigError(f"tensor_parallel={world} does not divide text_config.{what}={n}: each rank must hold "
                              f"the same number of them; choose a tensor_parallel that divides {n}")


def shard(model: nn.Module, group: Group) -> dict[str, Slice]:
    """Cut the decoder of a model still on the meta device to this rank's share, and install the collectives.
    Returns the checkpoint slice of every split tensor (by name), for the loader (`localize`)."""
    check(model.config, group.world)
    model.parallel = group
    if group.world == 1:
        return {}
    split = _Splitter(model, group)
    for i, layer in enumerate(model.model.language_model.layers):
        split.layer(f"model.language_model.layers.{i}", layer)
    if model.config.text.vocab_size % group.world == 0:
        split.linear("lm_head", 0)
    return split.slices


class _Splitter:
    """Replaces parameters of a meta-device model by this rank's share, recording each share for the loader."""

    def __init__(self, model: nn.Module, group: Group):
        self.model, self.group = model, group
        self.slices: dict[str, Slice] = {}

    def layer(self, prefix: str, layer: nn.Module) -> None:
        attn, world = layer.self_attn, self.group.world
        for proj in ("q_proj", "k_proj", "v_proj"):
            self.linear(f"{prefix}.self_attn.{proj}", 0)
        self.linear(f"{prefix}.self_attn.o_proj", 1)
        attn.num_heads //= world
        attn.num_kv_heads //= world
        if hasattr(layer.mlp, "experts"):  # MoE: a share of the experts (the router stays whole) and shared MLP
            experts = layer.mlp.experts
            experts.num_experts //= world
            experts.first, experts.split = self.group.rank * experts.num_experts, True
            self.cut(f"{prefix}.mlp.experts.gate_up_proj", 0)
            self.cut(f"{prefix}.mlp.experts.down_proj", 0)
            self.gated_mlp(f"{prefix}.mlp.shared_experts")
        else:
            self.gated_mlp(f"{prefix}.mlp")
        # the row-parallel projections' partial sums (and the experts' partial sum), added up before the residual
        attn.register_forward_hook(functools.partial(_reduce_output, self.group))
        layer.mlp.register_forward_hook(functools.partial(_reduce_output, self.group))

    def gated_mlp(self, name: str) -> None:
        if hasattr(self.model.get_submodule(name), "gate_up_proj"):  # the fused [gate; up] rows: a share of each
            self.linear(f"{name}.gate_up_proj", 0, chunks=2)
        else:
            self.linear(f"{name}.gate_proj", 0)
            self.linear(f"{name}.up_proj", 0)
        self.linear(f"{name}.down_proj", 1)

    def linear(self, name: str, dim: int, chunks: int = 1) -> None:
        """A column- (dim 0) or row-parallel (dim 1) linear layer."""
        module = self.model.get_submodule(name)
        if dim == 1 and module.bias is not None:  # each rank would add it: the all-reduce would sum it N times
            raise ConfigError(f"{name}: a row-parallel linear layer with a bias is not supported")
        self.cut(f"{name}.weight", dim, chunks)
        if module.bias is not None:
            self.cut(f"{name}.bias", dim, chunks)
        module.out_features, module.in_features = module.weight.shape

    def cut(self, name: str, dim: int, chunks: int = 1) -> None:
        """Parameter `name` (a model key) becomes this rank's 1/world along dim."""
        module_name, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        param = getattr(module, leaf)
        piece = Slice(dim, self.group.rank, self.group.world, chunks)
        setattr(module, leaf, nn.Parameter(torch.empty(piece.shape(param.shape), dtype=param.dtype,
                                                       device=param.device), requires_grad=False))
        self.slices[name] = piece


def localize(piece, slices: dict[str, Slice], local_shape: tuple[int, ...]):
    """A checkpoint piece (glmv.weights.Piece) as this rank loads it: a slice of a split tensor, one of this rank's
    experts at its local index, or None for another rank's expert. local_shape: the target's shape on this rank."""
    cut = slices.get(piece.target)
    if cut is None:
        return piece
    if not piece.index:
        return replace(piece, source=cut)
    # one expert of a stack split by expert (dim 0, the released per-expert layout)
    n = local_shape[0]
    e = piece.index[0] - cut.rank * n
    return replace(piece, index=(e, *piece.index[1:])) if 0 <= e < n else None


def _reduce_output(group: Group, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return group.all_reduce(output)


def logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """hidden (..., D) -> logits (..., vocab) on every rank: the lm_head's vocab slices gathered where it is split."""
    out = model.lm_head(hidden)
    group = model.parallel
    if group.world > 1 and out.shape[-1] != model.config.text.vocab_size:
        out = group.all_gather_last(out)
    return out
