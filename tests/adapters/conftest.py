"""Tiny models built in code and helpers shared by the adapter tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.adapters import adapted_layers


def llama() -> nn.Module:
    from rankwise.models import tiny_llama

    model, _ = tiny_llama(seed=0)
    return model.eval()


def gpt2() -> nn.Module:
    """A tiny GPT-2: its attention/MLP layers are transformers' transposed Conv1D."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


class ConvNet(nn.Module):
    """Embedding, Conv1d, Conv2d and Linear in one small module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 6)
        self.conv1 = nn.Conv1d(6, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.head = nn.Linear(4 * 4, 5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.embed(idx).transpose(1, 2))  # (N, 8, L)
        h = self.conv2(h.reshape(h.shape[0], 2, 4, -1))  # (N, 4, 4, L)
        return self.head(h.mean(-1).flatten(1))


def tokens(n: int = 2, length: int = 12, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def make_trained(model: nn.Module, name: str = "default", std: float = 0.1, seed: int = 0) -> None:
    """Give adapter ``name`` non-zero 'trained-like' weights (B and magnitude included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            if name not in layer.adapters:
                continue
            for pname, p in layer.adapters[name].named_parameters():
                noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * std
                if "magnitude" in pname:
                    p.mul_(1 + noise)
                else:
                    p.add_(noise)


def damage_adapter_folder(folder, damage: str, key: str) -> None:
    """Damage a saved adapter folder the way a bad download or edit would: ``truncate``
    the weights file, ``bad_json`` config, or change tensor ``key``: ``missing_key``,
    ``extra_key`` (a sibling ``lora_C``), ``nan``, ``transposed``."""
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
        return
    if damage == "bad_json":
        (folder / "adapter_config.json").write_text("{not json")
        return
    tensors = load_file(path)
    if damage == "missing_key":
        del tensors[key]
    elif damage == "extra_key":
        tensors[key.replace("lora_A", "lora_C").replace("lora_B", "lora_C")] = torch.ones(1)
    elif damage == "nan":
        tensors[key][0, 0] = float("nan")
    elif damage == "transposed":
        tensors[key] = tensors[key].t().contiguous()
    else:
        raise ValueError(f"unknown damage {damage!r}")
    save_file(tensors, path)


def perturb_peft_lora(model: nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Add seeded noise to every ``lora_`` parameter of a PEFT model (a trained-looking adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * std)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.fixture
def tiny() -> nn.Module:
    return llama()


@pytest.fixture(autouse=True)
def registries_left_as_found():
    """Every test leaves the method and initialiser registries as it found them."""
    from rankwise.adapters.base import INITIALISERS, METHODS

    before = (METHODS.names(), INITIALISERS.names())
    yield
    assert (METHODS.names(), INITIALISERS.names()) == before, "a test left registry entries behind"


def train(
    model: nn.Module, loss_fn, *, steps: int, lr: float, train_mode: bool = False
) -> list[float]:
    """Adam on the trainable parameters for ``steps`` steps of ``loss_fn()``; the losses.
    With ``train_mode`` the model trains in train mode and is put back in eval mode."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train(train_mode)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def assert_merge_round_trip(model: nn.Module, x: torch.Tensor) -> None:
    """Merged and then unmerged outputs equal the adapted model's (1e-5)."""
    from rankwise.adapters import merge, unmerge

    trained = logits(model, x)
    merge(model)
    torch.testing.assert_close(logits(model, x), trained, atol=1e-5, rtol=0)
    unmerge(model)
    torch.testing.assert_close(logits(model, x), trained, atol=1e-5, rtol=0)
