"""Tensor parallelism of the text decoder over the ranks of a torch.distributed group (NCCL on CUDA, gloo on CPU).

Megatron's split: per decoder layer q/k/v and gate/up are column-parallel (a rank holds num_heads / N query heads,
num_key_value_heads / N KV heads and intermediate_size / N MLP columns), o_proj and down_proj row-parallel, each
followed by one all-reduce of its partial sums: two collectives per layer. MoE layers (glmv.moe) split by expert
instead: every rank routes every token (the router is replicated and its inputs identical), runs the tokens sent to
its n_routed_experts / N experts and its share of the shared experts' columns, and the MLP's one all-reduce adds the
ranks' partial sums. The lm_head is vocab-split (vocab / N rows per rank, logits all-gathered) when the vocabulary
divides by N, replicated otherwise. A rank's KV cache holds its own KV heads only. Kept replicated for now, on every
rank: the token embedding, the norms and the vision tower (running the tower data-parallel over the admitted images
is a later step). FP8 releases are refused with tensor_parallel > 1 for now (their block scales would need splitting
on block boundaries).

Loading (glmv.weights) reads each rank's slices only, as views of the memory-mapped safetensors copied slice by
slice: a rank never holds a whole split tensor.

Rank coordination: every rank runs the same engine (glmv.engine) on the same inputs, in lockstep. The schedule
depends only on the inputs, the engine config and the tokens chosen; the tokens come from logits that are identical
on every rank (all-reduce and all-gather hand every rank the same bits: tests/test_tensor_parallel.py checks it on
gloo), and sampling draws from per-row seeds, not a global generator, so every rank chooses the same tokens, admits
the same rows at the same step and calls the same collectives in the same order. The replicated residual stream must
be the same bits on every rank too (else each rank's slice of the logits, or the whole logits of a replicated
lm_head, comes from a stream of its own): its only input that a rank computes alone from more than a table lookup is
the vision features (the tower is replicated, and on CUDA some kernels are not bitwise deterministic), so every
prefill starts from rank 0's input embeddings (one broadcast of (tokens, D) per prefill). Decode steps need no
message beyond the model's own collectives, and the engine is unchanged; the alternative, rank 0 broadcasting each
step's inputs, would put a host round trip in every decode step and a second code path in the engine. The caller's
side of the contract: every rank gets the same requests with the same seeds (generate's seed=None draws them from
torch's global generator: seed it alike on every rank), added at the same engine step. `generate` (one batch, then
run) meets it as is; the pipeline's model actor (pipeline/tp.py) has rank 0 decide when a batch joins and tell the
others before their next step, since batches arriving on a thread while the engine runs would join at different
steps on different ranks. The pool's size must agree too: a caller sizing kv_blocks from free memory takes the
smallest over the ranks.
"""

from __future__ import annotations

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

    def from_first(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's t on every rank."""
        if self.world > 1:
            t = t.contiguous()
            dist.broadcast(t, group_src=0, group=self.process_group)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """(..., n) per rank -> (..., world * n): the ranks' pieces side by side, rank order."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.process_group)
        return torch.cat(parts, dim=-1)


SINGLE = Group()


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
