import pytest
import torch
import torch.nn.functional as F

from megatron.bridge.models.losses import chunked_cross_entropy


def _plain(hidden, weight, labels):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="none").view(labels.shape)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("chunk_tokens", [7, 16, 64, 1000])
def test_chunked_cross_entropy_equals_the_plain_one_with_gradients(chunk_tokens, compiled):
    torch.manual_seed(0)
    hidden = torch.randn(3, 21, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 21))
    upstream = torch.rand(3, 21, dtype=torch.float64)

    expected = _plain(hidden, weight, labels)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    got = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=chunk_tokens, compiled=compiled)
    got_grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight))

    assert got.shape == labels.shape
    torch.testing.assert_close(got, expected.to(got.dtype))
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_compiled_chunked_cross_entropy_matches_in_bf16_autocast():
    # The trainer's case: bf16 logits under autocast, losses in fp32.
    torch.manual_seed(0)
    hidden = torch.randn(2, 40, 32, requires_grad=True)
    weight = torch.randn(300, 32, requires_grad=True)
    labels = torch.randint(0, 300, (2, 40))
    results = []
    for compiled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=32, compiled=compiled)
        assert loss.dtype == torch.float32
        grads = torch.autograd.grad(loss.sum(), (hidden, weight))
        results.append((loss.detach(), *grads))
    for eager, compiled in zip(*results, strict=True):
        # Both round the logits to bf16 (resolution 7.8e-3); fusion may round the softmax differently.
        torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


def test_chunked_cross_entropy_keeps_only_one_chunk_of_logits_for_backward():
    # With checkpointed chunks, autograd saves the inputs, not the [tokens, vocab] logits.
    hidden = torch.randn(4096, 8, requires_grad=True)
    weight = torch.randn(20_000, 8, requires_grad=True)
    labels = torch.randint(0, 20_000, (4096,))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=512)
    assert max(saved) < 4096 * 20_000 / 4
    loss.sum().backward()
    assert hidden.grad is not None and weight.grad is not None


def test_chunked_cross_entropy_runs_without_grad():
    hidden, weight = torch.randn(2, 300, 8), torch.randn(40, 8)
    labels = torch.randint(0, 40, (2, 300))
    with torch.no_grad():
        got = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=64)
    torch.testing.assert_close(got, _plain(hidden, weight, labels))
