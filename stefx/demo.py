"""``stefx demo``: the whole job on a small offline example, in about a minute on a CPU.

A GPT-2-shaped byte-level language model (built from a config, no download) is trained
in float on the text of Python's own documentation (``pydoc_data.topics``), quantized
with a preset, then fine-tuned with the straight-through estimators. It prints the
quantization plan, the held-out loss of the float model, of the quantized model before
QAT and after QAT.
"""

from __future__ import annotations

import math
import time

import torch

__all__ = ["corpus", "held_out_loss", "run_demo"]


def corpus() -> torch.Tensor:
    """The bytes of Python's own documentation (``pydoc_data.topics``), about 466 kB."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


@torch.no_grad()
def held_out_loss(
    model, data: torch.Tensor, seq: int, limit: int | None = None, batch: int = 32
) -> float:
    """Mean next-byte loss of ``model`` over consecutive ``seq``-byte windows of ``data``
    (the first ``limit`` windows, or all), in eval mode; the model is left in train mode."""
    model.eval()
    n = (data.numel() // seq) * seq
    windows = data[:n].view(-1, seq)[:limit]
    total = 0.0
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        total += model(input_ids=x, labels=x).loss.item() * len(x)
    model.train()
    return total / len(windows)


def _batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        yield torch.stack([data[s : s + seq] for s in starts.tolist()])


@torch.no_grad()
def _loss(model, data: torch.Tensor, seq: int, n: int = 8) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    losses = [
        model(input_ids=x, labels=x).loss.item()
        for x, _ in zip(_batches(data, 16, seq, gen), range(n), strict=False)
    ]
    model.train()
    return sum(losses) / len(losses)


def _train(model, data, steps: int, lr: float, seq: int, seed: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _, x in zip(range(steps), _batches(data, 16, seq, gen), strict=False):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def run_demo(recipe: str = "w4a8", float_steps: int = 120, qat_steps: int = 40) -> dict:
    """Train, quantize, fine-tune; return the three held-out losses."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:  # transformers is the optional 'hf' extra
        raise SystemExit("the demo needs transformers: pip install 'stefx[hf]'") from e
    import stefx

    torch.manual_seed(0)
    data = corpus()
    split = int(0.9 * data.numel())
    train, held_out = data[:split], data[split:]
    seq = 64
    config = GPT2Config(
        vocab_size=256,
        n_positions=seq,
        n_embd=128,
        n_layer=2,
        n_head=4,
        attn_implementation="eager",
        use_cache=False,
    )
    model = GPT2LMHeadModel(config)
    print(
        f"stefx demo: GPT-2-shaped byte LM, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, {data.numel():,} bytes of pydoc text"
    )
    t0 = time.perf_counter()
    _train(model, train, float_steps, 3e-3, seq, seed=0)
    float_loss = _loss(model, held_out, seq)
    print(
        f"float training: {float_steps} steps, held-out loss {float_loss:.3f} "
        f"({time.perf_counter() - t0:.0f} s)"
    )

    model = stefx.quantize(model, recipe, {"input_ids": torch.zeros(1, seq, dtype=torch.long)})
    before_qat = _loss(model, held_out, seq)
    t0 = time.perf_counter()
    _train(model, train, qat_steps, 1e-3, seq, seed=1)
    after_qat = _loss(model, held_out, seq)
    print(
        f"\n{recipe}: held-out loss {before_qat:.3f} after quantization, {after_qat:.3f} after "
        f"{qat_steps} QAT steps ({time.perf_counter() - t0:.0f} s); float {float_loss:.3f}"
    )
    print(
        f"perplexity per byte: float {math.exp(float_loss):.2f}, "
        f"quantized+QAT {math.exp(after_qat):.2f}"
    )
    return {"float": float_loss, "quantized": before_qat, "qat": after_qat}
