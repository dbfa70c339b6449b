"""Long-range models: padding changes nothing, S4D's convolution is its recurrence, self-pretraining feeds
fine-tuning, a small seeded convergence check."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polyformer.domains.longrange import (
    LongRangePretrainTask,
    LongRangeTask,
    LSTMConfig,
    S4DConfig,
    SequenceClassifier,
    SequenceClassifierConfig,
)
from polyformer.domains.longrange.model import S4DBlock
from polyformer.transformer import TransformerConfig

MIXERS = {
    "full": dict(mixer="transformer"),
    "local": dict(mixer="transformer", transformer=TransformerConfig(dim=32, depth=2, heads=4, attention="local",
                                                                     window=8, position="sinusoidal", max_len=64)),
    "linear": dict(mixer="transformer", transformer=TransformerConfig(dim=32, depth=2, heads=4, attention="linear",
                                                                      position="sinusoidal", max_len=64)),
    "cls": dict(mixer="transformer", pooling="cls"),
    "lstm": dict(mixer="lstm"),
    "s4d": dict(mixer="s4d"),
}


def small(**overrides) -> SequenceClassifierConfig:
    base = dict(vocab_size=20, num_classes=3,
                transformer=TransformerConfig(dim=32, depth=2, heads=4, position="sinusoidal", max_len=64),
                lstm=LSTMConfig(dim=16), s4d=S4DConfig(dim=32, depth=2, state=8))
    return SequenceClassifierConfig(**{**base, **overrides})


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_padding_changes_nothing(name, one_torch_thread):
    torch.manual_seed(0)
    model = SequenceClassifier(small(**MIXERS[name])).eval()
    tokens = torch.randint(2, 20, (3, 21))
    alone = torch.cat([model(tokens[i:i + 1, :n]) for i, n in enumerate((21, 13, 5))])
    padded = tokens.clone()
    padding = torch.zeros(3, 21, dtype=torch.bool)
    for i, n in enumerate((21, 13, 5)):
        padded[i, n:], padding[i, n:] = 0, True
    assert torch.allclose(model(padded, padding), alone, atol=1e-5)


def test_s4d_convolution_is_the_recurrence():
    """The FFT convolution with the ZOH kernel equals running x' = exp(ΔA) x + (exp(ΔA) − 1)/A · u, y = 2 Re(C x)."""
    torch.manual_seed(0)
    block = S4DBlock(S4DConfig(dim=4, depth=1, state=6, bidirectional=False))
    u = torch.randn(2, 4, 30, dtype=torch.float64)
    kernel = block.kernel.double()
    dt = kernel.log_dt.exp()[0][:, None]
    a = torch.complex(-kernel.log_a_real.exp(), kernel.a_imag)[0]
    c = torch.view_as_complex(kernel.c.contiguous())[0]
    state = torch.zeros(2, 4, 3, dtype=torch.complex128)
    outputs = []
    for step in range(30):
        state = (dt * a).exp() * state + ((dt * a).exp() - 1) / a * u[:, :, step, None]
        outputs.append(2 * (c * state).sum(-1).real)
    recurrent = torch.stack(outputs, dim=-1) + u * block.skip.double()[:, None]
    block.skip.data = block.skip.data.double()
    assert torch.allclose(block.convolve(u), recurrent, atol=1e-8)


def test_s4d_initialisation_follows_s4d_lin():
    kernel = SequenceClassifier(small(mixer="s4d")).mixer.blocks[0].kernel
    assert torch.allclose(kernel.a_imag[0, 0], math.pi * torch.arange(4).float())
    assert torch.allclose(kernel.log_a_real.exp(), torch.tensor(0.5))
    dt = kernel.log_dt.exp()
    assert dt.min() >= 1e-3 and dt.max() <= 1e-1


def batch(tokens: torch.Tensor, labels: torch.Tensor) -> dict:
    return {"tokens": tokens, "padding": tokens == 0, "labels": labels}


@pytest.mark.parametrize("mixer", ["transformer", "s4d", "lstm"])
def test_self_pretraining_then_fine_tuning(mixer, tmp_path, one_torch_thread):
    torch.manual_seed(0)
    config = small(mixer=mixer)
    pretrain = LongRangePretrainTask(model=config)
    tokens = torch.randint(2, 20, (4, 30))
    tokens[0, 20:] = 0  # padding
    loss = pretrain.step(batch(tokens, torch.zeros(4, dtype=torch.long)), "train")
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert pretrain.model.embed.weight.grad.abs().sum() > 0 and pretrain.decoder.head.weight.grad is not None
    path = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": pretrain.state_dict(), "hyper_parameters": {}}, path)
    task = LongRangeTask(model=config, init_from=str(path))
    task.finetune.exclude = ["model.head."]
    task.load_pretrained(str(path))
    for name, value in pretrain.model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(task.model.state_dict()[name], value), name


def test_pretraining_counts_no_padding():
    torch.manual_seed(0)
    task = LongRangePretrainTask(model=small())
    tokens = torch.randint(2, 20, (2, 40))
    tokens[:, 10:] = 0
    torch.manual_seed(1)  # the same mask in both calls
    predictions, targets, mask = task.predict_masked(batch(tokens, torch.zeros(2, dtype=torch.long)))
    per_token = F.cross_entropy(predictions.transpose(1, 2), targets, reduction="none")
    counted = mask.mask & (tokens != 0)
    expected = (per_token * counted).sum() / counted.sum()
    torch.manual_seed(1)
    assert torch.allclose(task.step(batch(tokens, torch.zeros(2, dtype=torch.long)), "train"), expected)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="pooling 'cls' reads a class token"):
        SequenceClassifierConfig(mixer="lstm", pooling="cls")
    with pytest.raises(ValueError, match="model.mixer must be"):
        SequenceClassifierConfig(mixer="gru")
    with pytest.raises(ValueError, match="even state"):
        S4DConfig(state=7)


@pytest.mark.parametrize("mixer", ["transformer", "s4d"])
def test_learns_a_long_range_rule(mixer, one_torch_thread):
    """Label = the first token's parity, 48 tokens later read through mean pooling: a seeded run learns it."""
    torch.manual_seed(0)
    task = LongRangeTask(model=small(mixer=mixer, num_classes=2))
    optimizer = torch.optim.AdamW(task.parameters(), lr=3e-3)
    for _ in range(300):
        tokens = torch.randint(2, 20, (32, 48))
        labels = tokens[:, 0] % 2
        loss = F.cross_entropy(task(tokens), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tokens = torch.randint(2, 20, (256, 48))
    accuracy = (task(tokens).argmax(-1) == tokens[:, 0] % 2).float().mean()
    assert accuracy > 0.9
