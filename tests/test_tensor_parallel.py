"""Tensor parallelism (glmv.parallel): a tiny checkpoint split over 2 gloo ranks on this CPU gives the logits of the
same model on one rank within float32 rounding, the same greedy tokens through generate (all rows in slots, and
refilling 2 slots), and every rank chooses the same tokens (the lockstep the engine relies on); a split that does not
divide the heads is refused before any work."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import glmv
from glmv import parallel
from glmv.testing import PRESETS
from test_model_parity import random_image

RANKS = 2
NEW_TOKENS = 10
# Float32 logits of a split model: each all-reduce adds 2 partial dot products where one rank sums in one go, so
# rounding differs by a few ulps per layer; measured max |diff| 2.6e-6 (logits up to ~4.6) on both tiny checkpoints.
LOGITS_ATOL = 2e-5


def conversations():
    image_a, image_b = random_image(84, 112, 21), random_image(56, 56, 22)
    rows = [([image_a], "Describe this image."), ([image_b], "Read all the text in the image."),
            ([], "Tell me a story about a long walk."), ([image_a], "Give a short caption.")]
    return [[{"role": "user", "content": [{"type": "image", "image": im} for im in images]
              + [{"type": "text", "text": text}]}] for images, text in rows]


def run_cases(model, inputs) -> dict:
    """What each rank computes: full logits, greedy generate (every row in a slot, then 2 slots refilled in turn,
    with per-row lengths so that rows finish at different steps), and seeded sampling."""
    with torch.no_grad():
        logits = model(**inputs).logits
    lengths = [NEW_TOKENS, 4, NEW_TOKENS, 7]
    gen = {k: inputs[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                  "image_grid_thw")}
    common = dict(eos_token_id=[], return_dict_in_generate=True)
    greedy = model.generate(**gen, max_new_tokens=NEW_TOKENS, do_sample=False, **common)
    refill = model.generate(**gen, max_new_tokens=lengths, do_sample=False, max_batch_size=2, **common)
    sampled = model.generate(**gen, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.0, seed=[1, 2, 3, 4],
                             **common)
    return {"logits": logits, "greedy": greedy.sequences, "refill": refill.sequences, "sampled": sampled.sequences}


def _rank(rank: int, port: int, cases: list[tuple[str, dict, str]]) -> None:
    torch.set_num_threads(1)  # 2 ranks on a shared CPU
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    try:
        group = parallel.Group(rank, RANKS)
        for checkpoint, inputs, out in cases:
            model = glmv.AutoModelForImageTextToText.from_pretrained(checkpoint, tensor_parallel=group)
            result = run_cases(model, inputs)
            result["kv_heads"], result["cache_heads"] = model.kv_heads, model.new_cache(4, 16, 1, 2).k[0].shape[2]
            torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one(tiny_gqa, tiny_mha, tmp_path):
    """tiny_gqa: 4 heads, 2 KV heads; tiny_mha: 6 heads and KV heads, full rotary. One spawn of 2 ranks runs both."""
    cases = []
    for checkpoint in (tiny_gqa, tiny_mha):
        processor = glmv.Glm4vProcessor.from_pretrained(checkpoint)
        inputs = dict(processor.apply_chat_template(conversations(), add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt", padding=True))
        cases.append((str(checkpoint), inputs, str(tmp_path / f"{checkpoint.name}.rank")))
    mp.spawn(_rank, args=(free_port(), cases), nprocs=RANKS, join=True)
    for checkpoint, inputs, out in cases:
        one = run_cases(glmv.AutoModelForImageTextToText.from_pretrained(checkpoint), inputs)
        check_ranks(checkpoint, inputs, one, [torch.load(f"{out}.{r}") for r in range(RANKS)])


def check_ranks(checkpoint, inputs, one: dict, ranks: list[dict]) -> None:
    config = glmv.Glm4vConfig.from_pretrained(checkpoint).text
    for r in ranks:
        assert r["kv_heads"] == r["cache_heads"] == config.num_key_value_heads // RANKS
        # the lockstep: every rank saw the same logits and chose the same tokens, sampled ones included
        assert torch.equal(r["logits"], ranks[0]["logits"])
        for case in ("greedy", "refill", "sampled"):
            assert torch.equal(r[case], ranks[0][case]), case
    split = ranks[0]
    valid = inputs["attention_mask"].bool()
    diff = (split["logits"] - one["logits"])[valid].abs().max().item()
    assert diff <= LOGITS_ATOL, f"{checkpoint}: max |logits diff| {diff:.2e} over image and text rows"
    assert torch.equal(split["greedy"], one["greedy"]), checkpoint
    assert torch.equal(split["refill"], one["refill"]), checkpoint
    # the refilled run's full-length rows are the all-slots run's rows
    assert torch.equal(split["refill"][[0, 2]], one["greedy"][[0, 2]]), checkpoint


def test_indivisible_heads_are_refused_before_loading(tiny_mha, tiny_gqa):
    # tiny_mha: 6 heads (4 ranks cannot share them); tiny_gqa: 2 KV heads (4 ranks cannot share them)
    with pytest.raises(glmv.ConfigError, match=r"tensor_parallel=4 does not divide text_config.num_attention_heads=6"):
        glmv.AutoModelForImageTextToText.from_pretrained(tiny_mha, tensor_parallel=parallel.Group(0, 4))
    with pytest.raises(glmv.ConfigError, match=r"tensor_parallel=4 does not divide text_config.num_key_value_heads=2"):
        glmv.AutoModelForImageTextToText.from_pretrained(tiny_gqa, tensor_parallel=parallel.Group(0, 4))


def test_moe_is_refused_with_tensor_parallel():
    with pytest.raises(glmv.ConfigError, match="mixture-of-experts decoder .* runs on one rank"):
        parallel.check(PRESETS["moe"], 2)
    parallel.check(PRESETS["moe"], 1)  # one rank: nothing to split


def test_single_rank_collectives_are_no_ops():
    t = torch.arange(6.0).view(2, 3)
    assert parallel.SINGLE.all_reduce(t) is t and parallel.SINGLE.all_gather_last(t) is t
    piece = parallel.Slice(dim=0, rank=1, world=2, chunks=2)  # [gate; up] rows: rank 1 takes the second half of each
    assert piece.take(torch.arange(8)).tolist() == [2, 3, 6, 7]
    assert piece.full(piece.shape((8, 3))) == (8, 3)
