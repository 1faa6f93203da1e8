"""The chunked loss against F.cross_entropy of the full logits: values and gradients, ignore_index, z-loss, dtypes."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_open.train.loss import lm_loss, naive_lm_loss

B, T, D, VOCAB = 2, 13, 16, 40  # 26 tokens: chunk sizes below leave uneven last chunks


def make_inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    output = nn.Linear(D, VOCAB, bias=False).to(dtype)
    with torch.no_grad():
        output.weight.copy_(torch.randn(VOCAB, D, generator=gen))
    hidden = torch.randn(B, T, D, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(VOCAB, (B, T), generator=gen)
    return hidden, output, targets


def grads(loss, hidden, output):
    hidden.grad = output.weight.grad = None
    loss.backward()
    return hidden.grad.clone(), output.weight.grad.clone()


def reference(hidden, output, targets, ignore_index=-100):
    logits = output(hidden).float().flatten(0, 1)
    return F.cross_entropy(logits, targets.flatten(), ignore_index=ignore_index), logits


@pytest.mark.parametrize("chunk_tokens", [1, 4, 5, 12, 25, 26, 27, 1000, 0, -1])
def test_loss_and_gradients_match_full_logits_cross_entropy(chunk_tokens):
    hidden, output, targets = make_inputs()
    expected, _ = reference(hidden, output, targets)
    expected_grads = grads(expected, hidden, output)

    out = lm_loss(hidden, output, targets, chunk_tokens=chunk_tokens)

    assert out.tokens == B * T
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    for got, want in zip(grads(out.loss, hidden, output), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_naive_loss_is_the_reference():
    hidden, output, targets = make_inputs()
    expected, _ = reference(hidden, output, targets)
    out = naive_lm_loss(hidden, output, targets)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    assert out.tokens == B * T


def test_ignored_targets_count_neither_in_the_sum_nor_in_the_mean():
    hidden, output, targets = make_inputs()
    targets[0, :8] = -100  # with chunk_tokens=4, the first two chunks have no valid target at all
    targets[1, 5] = -100
    expected, logits = reference(hidden, output, targets)
    expected_grads = grads(expected, hidden, output)

    out = lm_loss(hidden, output, targets, chunk_tokens=4)

    assert out.tokens == B * T - 9
    valid = targets.flatten() != -100
    manual = (logits.logsumexp(-1) - logits.gather(-1, targets.flatten().clamp(min=0)[:, None])[:, 0])[valid].mean()
    torch.testing.assert_close(out.loss, manual, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    hidden_grad, weight_grad = grads(out.loss, hidden, output)
    torch.testing.assert_close(hidden_grad, expected_grads[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weight_grad, expected_grads[1], rtol=1e-6, atol=1e-7)
    assert torch.all(hidden_grad[0, :8] == 0)  # an ignored token gets no gradient from the cross-entropy


def test_a_custom_ignore_index_that_is_a_vocabulary_id():
    hidden, output, targets = make_inputs()
    targets[:, ::3] = 7
    expected, _ = reference(hidden, output, targets, ignore_index=7)
    out = lm_loss(hidden, output, targets, chunk_tokens=5, ignore_index=7)
    assert out.tokens == int((targets != 7).sum())
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)


def test_all_targets_ignored_gives_nan_like_f_cross_entropy():
    hidden, output, targets = make_inputs()
    out = lm_loss(hidden, output, torch.full_like(targets, -100), chunk_tokens=4)
    assert out.tokens == 0 and math.isnan(out.loss.item())


def test_logsumexp_matches_the_full_logits_and_z_loss_gradients_flow():
    hidden, output, targets = make_inputs()
    targets[1, :3] = -100
    expected_ce, logits = reference(hidden, output, targets)
    expected_lse = torch.logsumexp(logits, dim=-1)
    expected_grads = grads(expected_ce + 1e-2 * (expected_lse**2).mean(), hidden, output)

    out = lm_loss(hidden, output, targets, chunk_tokens=5)

    assert out.logsumexp.shape == (B * T,) and out.logsumexp.dtype == torch.float32
    torch.testing.assert_close(out.logsumexp, expected_lse, rtol=1e-6, atol=0)
    z_loss = 1e-2 * (out.logsumexp**2).mean()
    for got, want in zip(grads(out.loss + z_loss, hidden, output), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # z-loss alone reaches the weights through the recomputed chunks too
    z_only = grads(1e-2 * (lm_loss(hidden, output, targets, chunk_tokens=5).logsumexp ** 2).mean(), hidden, output)
    z_expected = grads(1e-2 * (torch.logsumexp(output(hidden).float(), -1) ** 2).mean(), hidden, output)
    for got, want in zip(z_only, z_expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_bf16_hidden_and_weights_match_the_bf16_reference():
    hidden, output, targets = make_inputs(torch.bfloat16)
    expected, _ = reference(hidden, output, targets)
    expected_grads = grads(expected, hidden, output)

    out = lm_loss(hidden, output, targets, chunk_tokens=6)

    assert out.loss.dtype == torch.float32 and out.logsumexp.dtype == torch.float32
    # the logits are the same bf16 matmul results, so only the float32 reduction order differs
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    got_grads = grads(out.loss, hidden, output)
    assert got_grads[0].dtype == got_grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(got_grads[0], expected_grads[0])  # bf16 tolerances
    # the weight gradient sums over chunks in bf16 instead of one bf16 matmul over all tokens
    torch.testing.assert_close(got_grads[1].float(), expected_grads[1].float(), rtol=2e-2, atol=2e-3)


def test_tied_output_weight_gets_the_gradient_of_both_uses():
    def tied_model():
        embedding = nn.Embedding(VOCAB, D)
        output = nn.Linear(D, VOCAB, bias=False)
        output.weight = embedding.weight
        return embedding, output

    torch.manual_seed(0)
    embedding, output = tied_model()
    input_ids = torch.randint(VOCAB, (B, T))
    targets = torch.randint(VOCAB, (B, T))

    def weight_grad(loss_fn):
        embedding.weight.grad = None
        hidden = torch.tanh(embedding(input_ids))  # the embedding's gradient reaches the shared weight too
        loss_fn(hidden).backward()
        return embedding.weight.grad.clone()

    expected = weight_grad(lambda h: reference(h, output, targets)[0])
    got = weight_grad(lambda h: lm_loss(h, output, targets, chunk_tokens=7).loss)
    assert output.weight is embedding.weight
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    # both paths contribute: the output projection alone gives a different gradient
    output_only = weight_grad(lambda h: lm_loss(h.detach(), output, targets, chunk_tokens=7).loss)
    assert not torch.allclose(output_only, expected)


def test_output_is_called_as_a_module_for_every_chunk():
    hidden, output, targets = make_inputs()
    calls = []
    output.register_forward_hook(lambda module, args, result: calls.append(args[0].shape[0]))
    out = lm_loss(hidden, output, targets, chunk_tokens=10)
    assert calls == [10, 10, 6]
    out.loss.backward()
    assert sorted(calls[3:]) == [6, 10, 10]  # each chunk recomputed once (in whatever order autograd picks)


def test_without_grad_for_evaluation():
    hidden, output, targets = make_inputs()
    expected, _ = reference(hidden, output, targets)
    with torch.no_grad():
        out = lm_loss(hidden, output, targets, chunk_tokens=5)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-6, atol=0)


def test_mismatched_shapes_are_rejected():
    hidden, output, targets = make_inputs()
    with pytest.raises(ValueError, match="disagree"):
        lm_loss(hidden, output, targets[:, :-1])
