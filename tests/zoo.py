"""A table-driven model zoo for capture, match, rewrite and profile tests.

Every builder returns ``(model, example_inputs)`` for a tiny, seeded model: plain PyTorch
models in ``PLAIN_ZOO`` and Hugging Face transformers v5 models built from tiny configs
(never from the hub) in ``HF_ZOO``. ``example_inputs`` is a tuple of positional args or a
dict of kwargs, as ``stefx.capture.capture`` takes them. Builders return a fresh model on
every call (tests may mutate what they get); only the pure-Python config objects are shared.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Built = tuple[nn.Module, Any]

__all__ = ["HF_ZOO", "PLAIN_ZOO", "Built", "build", "hf_config"]


# --------------------------------------------------------------------------- plain PyTorch


class ResidualCNN(nn.Module):
    """Conv-BN-ReLU stem, one residual block (add), pooling and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        return self.fc(torch.flatten(self.pool(x), 1))


class GroupedConvNet(nn.Module):
    """Depthwise, grouped and pointwise convolutions, plus a Conv1d and a Conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.pointwise = nn.Conv2d(16, 8, 1)
        self.conv1d = nn.Conv1d(8, 4, 3, padding=1)
        self.conv3d = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pointwise(F.relu6(self.grouped(self.depthwise(x))))
        y = self.conv1d(x.flatten(2))
        return y, self.conv3d(v)


class ConvTransposeNet(nn.Module):
    """An encoder-decoder that upsamples with ConvTranspose2d and ConvTranspose1d."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.up1d = nn.ConvTranspose1d(4, 2, 3, stride=2, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(torch.sigmoid(self.down(x)))
        return self.up1d(y.mean(-1))


class MLP(nn.Module):
    """Linear-GELU-Linear with a LayerNorm; the simplest thing a recipe targets."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class Functional(nn.Module):
    """Functional ops on raw parameters: F.linear, einsum, SDPA, F.embedding, addmm, bmm."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(20, 16))
        self.w = nn.Parameter(torch.randn(16, 16))
        self.b = nn.Parameter(torch.zeros(16))
        self.mix = nn.Parameter(torch.randn(16, 16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.table)  # [B, T, 16]
        x = F.linear(x, self.w, self.b)
        x = torch.einsum("btd,de->bte", x, self.mix)
        q = x.view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        y = a.transpose(1, 2).reshape(x.shape[0] * x.shape[1], 16)
        y = torch.addmm(self.b, y, self.w)
        return torch.bmm(y.view(x.shape[0], x.shape[1], 16), x.transpose(1, 2))


class PlainAttention(nn.Module):
    """ViT attention written out: q @ k^T, softmax, @ v."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class PlainViT(nn.Module):
    """A ViT-style encoder in plain torch: conv patch embedding, cls token, 2 blocks."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(dim),
                    "attn": PlainAttention(dim, heads),
                    "norm2": nn.LayerNorm(dim),
                    "mlp": nn.Sequential(
                        nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
                    ),
                }
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = x + blk["attn"](blk["norm1"](x))
            x = x + blk["mlp"](blk["norm2"](x))
        return self.head(self.norm(x)[:, 0])


class RecurrentNet(nn.Module):
    """Embedding -> LSTM or GRU -> Linear on the last step."""

    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.rnn = cell(16, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(ids))
        return self.head(out[:, -1])


class DataDependentBlock(nn.Module):
    """Branches on a tensor value, which symbolic tracing cannot follow."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Linear(16, 16)
        self.neg = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.pos(x)
        return self.neg(x)


class WithDataDependent(nn.Module):
    """Traceable layers around one untraceable block (exercises auto-leaf)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.block = DataDependentBlock()
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.block(self.inp(x))))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 2, 1)
        self.expand = nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


class UNet(nn.Module):
    """Encoder-decoder: strided conv down, squeeze-excite gate, ConvTranspose + BN up,
    a concatenated skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down2 = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.gate = SqueezeExcite(16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(8)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down1(x)
        y = self.gate(self.down2(skip))
        y = F.relu(self.up_bn(self.up(y)))
        return self.out(torch.cat([skip, y], dim=1))


class TorchTransformer(nn.Module):
    """torch.nn's own TransformerEncoder: a torch.nn container (fx would keep it whole)
    holding nn.MultiheadAttention, whose out_proj Linear is never called as a module."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)))


def _seeded(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return make()


def residual_cnn() -> Built:
    return _seeded(ResidualCNN), (torch.randn(2, 3, 16, 16),)


def grouped_conv() -> Built:
    return _seeded(GroupedConvNet), (torch.randn(1, 8, 8, 8), torch.randn(1, 1, 4, 4, 4))


def conv_transpose() -> Built:
    return _seeded(ConvTransposeNet), (torch.randn(1, 3, 8, 8),)


def mlp() -> Built:
    return _seeded(MLP), (torch.randn(4, 16),)


def functional() -> Built:
    return _seeded(Functional), (torch.randint(0, 20, (2, 6)),)


def plain_vit() -> Built:
    return _seeded(PlainViT), (torch.randn(1, 3, 16, 16),)


def lstm() -> Built:
    return _seeded(lambda: RecurrentNet(nn.LSTM)), (torch.randint(0, 50, (2, 7)),)


def gru() -> Built:
    return _seeded(lambda: RecurrentNet(nn.GRU)), (torch.randint(0, 50, (2, 7)),)


def data_dependent() -> Built:
    return _seeded(WithDataDependent), (torch.randn(3, 8),)


def unet() -> Built:
    return _seeded(UNet), (torch.randn(2, 3, 16, 16),)


def torch_transformer() -> Built:
    return _seeded(TorchTransformer), (torch.randint(0, 50, (2, 6)),)


PLAIN_ZOO: dict[str, Callable[[], Built]] = {
    "residual_cnn": residual_cnn,
    "grouped_conv": grouped_conv,
    "conv_transpose": conv_transpose,
    "mlp": mlp,
    "functional": functional,
    "plain_vit": plain_vit,
    "lstm": lstm,
    "gru": gru,
    "data_dependent": data_dependent,
    "torch_transformer": torch_transformer,
    "unet": unet,
}


# --------------------------------------------------------------------------- Hugging Face

# Shared tiny decoder sizes; ids stay inside the 128-token vocabulary.
_DECODER = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_MOE = dict(num_experts_per_tok=2)

# name -> (config class name, config kwargs, auto class name, attention implementation)
_HF_SPECS: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "gpt2": (
        "GPT2Config",
        dict(
            vocab_size=128,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "AutoModelForCausalLM",
        "eager",
    ),
    "llama": ("LlamaConfig", _DECODER, "AutoModelForCausalLM", "eager"),
    "qwen2": ("Qwen2Config", _DECODER, "AutoModelForCausalLM", "eager"),
    "qwen3": ("Qwen3Config", _DECODER, "AutoModelForCausalLM", "sdpa"),
    "mistral": ("MistralConfig", _DECODER, "AutoModelForCausalLM", "eager"),
    "gemma": ("GemmaConfig", _DECODER, "AutoModelForCausalLM", "eager"),
    "phi3": ("Phi3Config", _DECODER, "AutoModelForCausalLM", "eager"),
    # FalconLinear computes input @ self.weight.T: the weight reaches the matmul through
    # a transpose view (aten.numpy_T), which capture must see through.
    "falcon": (
        "FalconConfig",
        dict(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_hidden_size=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "AutoModelForCausalLM",
        "eager",
    ),
    "mixtral": (
        "MixtralConfig",
        {**_DECODER, **_MOE, "num_local_experts": 4},
        "AutoModelForCausalLM",
        "eager",
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            **_DECODER,
            **_MOE,
            "num_experts": 4,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
        "AutoModelForCausalLM",
        "eager",
    ),
    "bert": (
        "BertConfig",
        dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
        "AutoModelForMaskedLM",
        "eager",
    ),
    "roberta": (
        "RobertaConfig",
        dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
        "AutoModelForSequenceClassification",
        "sdpa",
    ),
    "vit": (
        "ViTConfig",
        dict(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_labels=3,
        ),
        "AutoModelForImageClassification",
        "eager",
    ),
    "whisper": (
        "WhisperConfig",
        dict(
            vocab_size=128,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=16,
            max_source_positions=16,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
            suppress_tokens=None,
            begin_suppress_tokens=None,
        ),
        "AutoModelForSpeechSeq2Seq",
        "eager",
    ),
}


def hf_config(name: str) -> Any:
    """The tiny config of HF zoo model ``name`` (a fresh object)."""
    import transformers

    config_cls, kwargs, _, attn = _HF_SPECS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = attn
    return config


def _hf_builder(name: str) -> Callable[[], Built]:
    def build_hf() -> Built:
        import transformers

        auto = getattr(transformers, _HF_SPECS[name][2])
        torch.manual_seed(0)
        model = auto.from_config(hf_config(name), attn_implementation=_HF_SPECS[name][3])
        return model, None  # stefx builds the inputs from the config

    build_hf.__name__ = f"hf_{name}"
    return build_hf


HF_ZOO: dict[str, Callable[[], Built]] = {name: _hf_builder(name) for name in _HF_SPECS}


def build(name: str) -> Built:
    """Build zoo model ``name`` from either table."""
    return (PLAIN_ZOO.get(name) or HF_ZOO[name])()
