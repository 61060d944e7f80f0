"""Built-in models, looked up by ``model.name`` with ``model.kwargs``.

Classification models take float features shaped like the data (``[B, C, H, W]``; the MLP
flattens any shape) and return logits ``[B, num_classes]``. The GPT takes int64 tokens
``[B, T]`` and returns logits ``[B, T, vocab_size]``. Nothing here knows about distribution:
DDP, devices and precision are applied from outside.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainers.errors import UserError
from trainers.registry import Registry, call_with_kwargs

MODELS: Registry[Callable[..., nn.Module]] = Registry(kind="model", field="model.name")


def build_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    builder = MODELS.get(name)
    _check_sizes(builder, kwargs)
    return call_with_kwargs(builder, kwargs, field="model.kwargs")


def _check_sizes(builder: Callable[..., nn.Module], kwargs: dict[str, Any]) -> None:
    # Every int kwarg of a builder is a size or count; torch's own error for 0 or -1 is cryptic.
    params = inspect.signature(builder, eval_str=True).parameters
    for key, value in kwargs.items():
        if key in params and params[key].annotation is int and type(value) is int and value <= 0:
            raise UserError(f"model.kwargs.{key}: must be > 0, got {value}")


# ---------------------------------------------------------------------------------------------
# Classifiers


@MODELS.register("mlp")
def mlp(
    in_features: int = 64, hidden: int = 128, depth: int = 2, num_classes: int = 10
) -> nn.Module:
    """``depth`` hidden layers of width ``hidden``; flattens whatever shape it is given."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


@MODELS.register("cnn")
def cnn(in_channels: int = 1, num_classes: int = 10, width: int = 32) -> nn.Module:
    """Two conv stages for small images (8x8 digits and up); pooled to 2x2 for any size >= 2."""
    return nn.Sequential(
        _conv_bn(in_channels, width),
        _conv_bn(width, width),
        nn.MaxPool2d(2),
        _conv_bn(width, 2 * width),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 4, num_classes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut, as in ResNet-18."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


@MODELS.register("resnet")
def resnet(
    in_channels: int = 3, num_classes: int = 10, width: int = 32, depth: int = 2, stages: int = 3
) -> nn.Module:
    """CIFAR-style ResNet: each stage doubles the width and halves the resolution."""
    layers: list[nn.Module] = [_conv_bn(in_channels, width)]
    c_in = width
    for stage in range(stages):
        c_out = width * 2**stage
        for block in range(depth):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(BasicBlock(c_in, c_out, stride))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------
# GPT (after nanoGPT: pre-LayerNorm blocks, weight-tied head, fused causal attention)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(
        self,
        *,
        vocab_size: int,
        context: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.context = context
        self.n_layer = n_layer
        self.n_embd = n_embd
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(context, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale residual projections so the residual stream's variance does not grow
        # with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        if T > self.context:
            raise UserError(
                f"model.kwargs.context: sequence length {T} exceeds context {self.context}; "
                "raise context or shorten the data's sequences"
            )
        pos = torch.arange(T, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), the PaLM / nanoGPT estimate.

        N excludes the position embeddings (a lookup, no matmul) but keeps the token
        embedding, which as the tied head does cost a matmul.
        """
        n = sum(p.numel() for p in self.parameters()) - self.pos_emb.weight.numel()
        return 6 * n + 12 * self.n_layer * self.n_embd * self.context


@MODELS.register("gpt")
def gpt(
    vocab_size: int = 256,
    context: int = 128,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    dropout: float = 0.0,
) -> GPT:
    if n_embd % n_head:
        raise UserError(f"model.kwargs.n_embd: must be divisible by n_head={n_head}, got {n_embd}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"model.kwargs.dropout: must be in [0, 1), got {dropout}")
    return GPT(
        vocab_size=vocab_size,
        context=context,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        dropout=dropout,
    )
