import math

import torch

from align import losses


def test_sft_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    targets = torch.tensor([0, 1])
    p0 = math.exp(2) / (math.exp(2) + 2)
    p1 = math.e / (1 + math.e + math.exp(3))
    expected = -(math.log(p0) + math.log(p1)) / 5  # divided by the global count, not by 2
    assert abs(losses.sft_loss(logits, targets, 5).item() - expected) < 1e-6
    assert torch.allclose(losses.token_logprobs(logits, targets), torch.tensor([math.log(p0), math.log(p1)]))


def test_accumulated_micro_batches_give_the_big_batch_gradient():
    torch.manual_seed(0)
    weight = torch.randn(4, 6, requires_grad=True)
    hidden = torch.randn(10, 4)
    targets = torch.randint(0, 6, (10,))
    losses.sft_loss(hidden @ weight, targets, 10).backward()
    full = weight.grad.clone()
    weight.grad = None
    for part in (slice(0, 3), slice(3, 10)):  # unequal micro-batches: a per-micro-batch mean would be wrong here
        losses.sft_loss(hidden[part] @ weight, targets[part], 10).backward()
    torch.testing.assert_close(weight.grad, full)


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert losses.masked_mean(values, mask).item() == (1 + 2 + 6) / 3
    assert losses.masked_mean(values, mask, dim=1).tolist() == [1.5, 6.0]
