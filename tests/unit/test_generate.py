"""lit_open.generate: greedy against a step-by-step reference, batching, seeded sampling, top_k, stops, context."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_open.generate import generate
from lit_open.model import ModelConfig, Transformer

# vocab 100 padded to 112: the padding rows of the output head must never be generated
CONFIG = ModelConfig(
    vocab_size=100, pad_vocab_multiple=16, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=64, max_seq_len=24
)
PROMPTS = [[5, 17, 42], [7], [99, 3, 3, 60, 1, 8, 23]]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    with torch.no_grad():  # sharper logits than the initialisation's near-uniform ones: no argmax near-ties
        model.output.weight.mul_(20)
    return model


def reference_greedy(model: Transformer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """One full forward of the whole sequence per token, argmax over the real vocabulary."""
    seq = list(prompt)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([seq[-CONFIG.max_seq_len :]]))
        seq.append(int(logits[0, -1, : CONFIG.vocab_size].argmax()))
    return seq[len(prompt) :]


def test_greedy_equals_the_argmax_of_full_forwards_one_token_at_a_time(model):
    for prompt in PROMPTS:
        out = generate(model, [prompt], 10)
        assert out == [reference_greedy(model, prompt, 10)]
        assert len(out[0]) == 10 and all(0 <= t < CONFIG.vocab_size for t in out[0])


def test_a_batch_of_prompts_of_different_lengths_equals_one_by_one(model):
    batched = generate(model, PROMPTS, 8)
    assert batched == [generate(model, [p], 8)[0] for p in PROMPTS]


def sampled(model, seed: int, **options) -> list[list[int]]:
    return generate(model, PROMPTS, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed), **options)


def test_sampling_repeats_itself_with_the_same_seed_and_differs_with_another(model):
    first = sampled(model, 7)
    assert first == sampled(model, 7)
    assert first != sampled(model, 8)
    assert first != generate(model, PROMPTS, 12)  # not greedy in disguise
    assert all(0 <= t < CONFIG.vocab_size for row in first for t in row)


def test_top_k_restricts_the_draw_to_the_k_most_likely_tokens(model):
    assert sampled(model, 7, top_k=1) == generate(model, PROMPTS, 12)
    # with top_k=3 every drawn token is among the 3 most likely after its prefix
    for prompt, row in zip(PROMPTS, sampled(model, 3, top_k=3)):
        seq = list(prompt)
        for token in row:
            logits = model(torch.tensor([seq]))[0, -1, : CONFIG.vocab_size]
            assert token in logits.topk(3).indices.tolist()
            seq.append(token)


def test_a_stop_id_ends_its_row_without_being_included_and_other_rows_go_on(model):
    free = generate(model, PROMPTS, 10)
    stop_id = free[0][3]
    first_at = free[0].index(stop_id)
    out = generate(model, PROMPTS, 10, stop_ids=[stop_id])
    assert out[0] == free[0][:first_at]
    for row, free_row in zip(out[1:], free[1:]):
        assert row == (free_row[: free_row.index(stop_id)] if stop_id in free_row else free_row)


def test_a_stop_callback_ends_a_row_including_the_token_that_satisfied_it(model):
    free = generate(model, PROMPTS, 10)
    target = free[2][4]
    out = generate(model, PROMPTS, 10, stop=lambda new: new[-1] == target)
    for row, free_row in zip(out, free):
        assert row == (free_row[: free_row.index(target) + 1] if target in free_row else free_row)
    assert generate(model, PROMPTS, 10, stop=lambda new: len(new) == 4) == [row[:4] for row in free]


def test_zero_new_tokens_and_an_empty_batch_give_nothing(model):
    assert generate(model, PROMPTS, 0) == [[], [], []]
    assert generate(model, [], 5) == []


def test_long_prompts_keep_their_last_context_tokens_and_generation_slides_past_the_context(model):
    long_prompt = [(7 * i) % CONFIG.vocab_size for i in range(CONFIG.max_seq_len + 9)]
    tail = long_prompt[-CONFIG.max_seq_len :]
    assert generate(model, [long_prompt], 6) == generate(model, [tail], 6) == [reference_greedy(model, tail, 6)]
    near_full = long_prompt[: CONFIG.max_seq_len - 2]  # 2 tokens of room, 6 generated: the window slides
    assert generate(model, [near_full], 6) == [reference_greedy(model, near_full, 6)]


def test_bad_arguments_are_refused(model):
    with pytest.raises(ValueError, match="temperature"):
        generate(model, PROMPTS, 4, temperature=-0.5)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 4)


def test_the_mode_and_the_gradients_are_left_alone(model):
    model.train()
    try:
        generate(model, PROMPTS, 2)
        assert model.training and all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_on_a_device_float32_greedy_equals_the_cpu_and_bf16_gives_valid_tokens(model, device):
    """generate keeps no KV cache (one full forward per new token): on a GPU only the kernels change."""
    expected = generate(model, PROMPTS, 10)
    moved = copy.deepcopy(model).to(device)
    assert next(moved.parameters()).device.type == device
    # float32 logits of the two devices' kernels differ by ~1e-5, and the smallest lead of the top token over the
    # second along these rows is 0.036 (logits up to ~9): the argmaxes are the same
    assert generate(moved, PROMPTS, 10) == expected
    draws = [
        generate(moved, PROMPTS, 12, temperature=1.0, top_k=5, generator=torch.Generator(device).manual_seed(7))
        for _ in range(2)
    ]
    assert draws[0] == draws[1]  # a generator on the model's device, seeded alike, draws alike
    assert all(len(row) == 12 and all(0 <= t < CONFIG.vocab_size for t in row) for row in draws[0])
    moved.to(torch.bfloat16)
    half = generate(moved, PROMPTS, 10)
    assert all(len(row) == 10 and all(0 <= t < CONFIG.vocab_size for t in row) for row in half)  # no padding id
    # bf16 moves these logits by up to ~0.04; each prompt's first token leads the second by more than 1.0
    assert [row[0] for row in half] == [row[0] for row in expected]
    assert generate(moved, PROMPTS, 10) == half  # repeatable


def tensor_parallel_worker() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from lit_open.config import StrategyConfig
    from lit_open.parallel import materialize, parallelize

    torch.manual_seed(0)
    whole = Transformer(CONFIG).eval()
    with torch.no_grad():
        whole.output.weight.mul_(20)
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    with torch.device("meta"):
        sharded = Transformer(CONFIG)
    materialize(parallelize(sharded, StrategyConfig(name="tp"), mesh), torch.device("cpu"), seed=0)
    with torch.no_grad():
        for name, param in sharded.named_parameters():
            param.copy_(distribute_tensor(whole.state_dict()[name], param.device_mesh, param.placements))
    sharded.eval()
    # widths 7, 8, 9, ...: odd ones are padded to the tensor-parallel degree, which sequence parallelism splits by
    assert generate(sharded, PROMPTS, 6) == generate(whole, PROMPTS, 6)
    draws = [
        generate(model, PROMPTS, 6, temperature=1.0, generator=torch.Generator().manual_seed(5))
        for model in (sharded, whole)
    ]
    assert draws[0] == draws[1]


@pytest.mark.slow
def test_a_tensor_parallel_model_generates_what_the_whole_one_does():
    from conftest import run_gloo

    run_gloo(tensor_parallel_worker)
