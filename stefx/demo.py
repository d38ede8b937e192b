"""``stefx demo``: the whole job on the small language model that ships with stefx.

The model (``stefx/demo_lm/``: a byte-level Llama, 0.87M parameters, trained in float by
``tools/train_demo_lm.py`` on Python's own documentation, ``pydoc_data.topics``, until its
held-out loss flattened) is profiled, quantized (``bitnet-b158`` by default), evaluated
right after quantization (PTQ), fine-tuned with the straight-through estimators (QAT)
under a progress bar, evaluated, converted to packed low-bit weights, saved, reloaded,
and asked to write a line of text. The comparison is fair: the float model gets the
same extra fine-tuning steps, data order and learning rate as QAT, and the summary
shows float, float + the same steps, PTQ and QAT side by side. Runs offline, in about
two minutes on 2 CPU cores.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "DEMO_LM",
    "corpus",
    "corpus_split",
    "demo_config",
    "held_out_loss",
    "load_demo_lm",
    "run_demo",
    "train_steps",
]

#: where the shipped float model lives (written by tools/train_demo_lm.py)
DEMO_LM = Path(__file__).parent / "demo_lm"
SEQ = 128


def corpus() -> torch.Tensor:
    """The bytes of Python's own documentation (``pydoc_data.topics``), about 466 kB."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def corpus_split() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held out): the first 90% of :func:`corpus` and the last 10%, the split every
    stefx LM example, benchmark and the demo use."""
    data = corpus()
    split = data.numel() * 9 // 10
    return data[:split], data[split:]


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


def demo_config():
    """The shipped model's architecture: a byte-level Llama, hidden 128, 4 layers."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip


def train_steps(
    model,
    data: torch.Tensor,
    steps: int,
    lr: float,
    seed: int,
    *,
    batch: int = 16,
    seq: int = SEQ,
    log_every: int = 0,
    log: Callable[[int, float], None] | None = None,
    progress: str | None = None,
) -> list[float]:
    """AdamW over random ``batch`` x ``seq``-token windows of ``data`` (order fixed by
    ``seed``), warm-up then cosine decay, learning rates per stefx's recipe
    (:func:`stefx.train.param_groups`); returns the training losses. ``progress``: a
    tqdm bar with that label."""
    import stefx

    if steps < 1 or data.numel() <= seq:
        raise stefx.StefxError(
            f"train: steps={steps} on {data.numel()} tokens of {seq}-token windows; need "
            "steps >= 1 and more tokens than one window"
        )
    opt = torch.optim.AdamW(stefx.train.param_groups(model, lr), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    g = torch.Generator().manual_seed(seed)
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=progress, unit="step", leave=True)
    losses = []
    model.train()
    for step in range(steps):
        starts = torch.randint(0, data.numel() - seq, (batch,), generator=g).tolist()
        x = torch.stack([data[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if log and log_every and (step + 1) % log_every == 0:
            log(step + 1, loss.item())
    if bar is not None:
        bar.close()
    return losses


def load_demo_lm():
    """The shipped float model, in fp32 (stored in fp16)."""
    import transformers

    from stefx.errors import StefxError

    if not (DEMO_LM / "model.safetensors").is_file():
        raise StefxError(
            f"demo: the shipped model is missing from {DEMO_LM}; reinstall stefx or run "
            "python tools/train_demo_lm.py"
        )
    return transformers.LlamaForCausalLM.from_pretrained(DEMO_LM, dtype=torch.float32).eval()


@torch.no_grad()
def _generate(model, prompt: str, n: int = 60) -> str:
    """Greedy bytes after ``prompt`` (up to a newline), decoded as UTF-8."""
    ids = torch.tensor([list(prompt.encode())])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    text = bytes(out[0, ids.shape[1] :].tolist()).decode("utf-8", errors="replace")
    return prompt + text.split("\n")[0]


def _size(model) -> int:
    """Bytes of the model's state dict as stored (packed codes, scales and the rest)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def run_demo(
    recipe: str = "bitnet-b158",
    steps: int = 300,
    *,
    lr: float = 3e-4,
    eval_windows: int = 96,
    plot: str | None = None,
    progress: bool = True,
) -> dict:
    """Run the demo (see the module docstring); returns its figures."""
    try:
        import transformers
    except ImportError as e:  # transformers is the optional 'hf' extra
        raise SystemExit("the demo needs transformers: pip install 'stefx[hf]'") from e
    import stefx

    t_start = time.perf_counter()
    torch.manual_seed(0)
    train, val = corpus_split()
    base = load_demo_lm()
    n_params = sum(p.numel() for p in base.parameters())
    print(f"stefx demo: byte-level Llama shipped with stefx ({n_params:,} parameters, trained "
          f"in float on {train.numel():,} bytes of Python's docs); recipe {recipe}\n")  # fmt: skip

    def ppl(model) -> float:
        return math.exp(held_out_loss(model, val, SEQ, eval_windows))

    example = {"input_ids": torch.zeros(1, SEQ, dtype=torch.long)}
    q = stefx.quantize(copy.deepcopy(base), recipe, example)  # prints the per-layer report
    report = stefx.profile(q, example)
    ppl_float, ppl_ptq = ppl(base), ppl(q)
    print(f"\nheld-out perplexity per byte: float {ppl_float:.3f}, {recipe} right after "
          f"quantization (PTQ) {ppl_ptq:.3f}")  # fmt: skip

    float_ft = copy.deepcopy(base)
    curves = {
        "float": train_steps(float_ft, train, steps, lr, seed=1, progress=_bar(progress, "float")),
        "qat": train_steps(q, train, steps, lr, seed=1, progress=_bar(progress, f"QAT {recipe}")),
    }
    ppl_float_ft, ppl_qat = ppl(float_ft), ppl(q)

    q.eval()
    stefx.convert(q)
    ppl_conv = ppl(q)
    with tempfile.TemporaryDirectory() as tmp:
        q.save_pretrained(tmp)
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
        ppl_back = ppl(back)
    line = _generate(back, "The ")

    t = report.totals
    rows = [
        ("float (shipped)", _size(base), t["before"]["bops"], t["before"]["energy_j"], ppl_float),
        (f"float + {steps} steps", _size(base), t["before"]["bops"], t["before"]["energy_j"],
         ppl_float_ft),
        (f"{recipe} PTQ", _size(q), t["after"]["bops"], t["after"]["energy_j"], ppl_ptq),
        (f"{recipe} QAT {steps} steps", _size(q), t["after"]["bops"], t["after"]["energy_j"],
         ppl_qat),
    ]  # fmt: skip
    from tabulate import tabulate

    print("\nsummary (size: the state dict as stored, float in fp32, quantized converted to "
          "packed codes; BOPs and energy: estimates of stefx.profile for one 128-byte window, "
          f"{report.hardware})")  # fmt: skip
    print(tabulate(
        [(n, f"{s / 1e6:.2f} MB", f"{b:.3g}", f"{e * 1e6:.1f} uJ", f"{p:.3f}")
         for n, s, b, e, p in rows],
        headers=["model", "size", "BOPs", "energy", "perplexity/byte"],
    ))  # fmt: skip
    print(f"\nconverted (packed weights): perplexity {ppl_conv:.3f}; saved with save_pretrained "
          f"and reloaded with from_pretrained: {ppl_back:.3f}")  # fmt: skip
    print(f"the reloaded model writes: {line!r}")
    gap = (ppl_qat / ppl_float_ft - 1) * 100
    seconds = time.perf_counter() - t_start
    print(f"\nQAT is {gap:+.1f}% from float given the same {steps} steps "
          f"({seconds:.0f} s in all)")  # fmt: skip
    if plot:
        _plot(plot, curves, rows, recipe)
        print(f"plot: {plot}")
    return {
        "float": ppl_float,
        "float_ft": ppl_float_ft,
        "ptq": ppl_ptq,
        "qat": ppl_qat,
        "converted": ppl_conv,
        "reloaded": ppl_back,
        "text": line,
        "rows": rows,  # (name, bytes, BOPs, energy J, perplexity) per summary row
        "seconds": seconds,
    }


def _bar(on: bool, label: str) -> str | None:
    return label if on else None


def _plot(path: str, curves: dict, rows: list, recipe: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, losses in curves.items():
        smooth = torch.tensor(losses).unfold(0, min(10, len(losses)), 1).mean(1)
        a.plot(smooth.tolist(), label=name if name == "float" else f"QAT {recipe}")
    a.set(xlabel="fine-tuning step", ylabel="training loss (10-step mean)", title="fine-tuning")
    a.legend()
    for i, (name, size, _, _, p) in enumerate(rows):
        b.scatter(size / 1e6, p)
        offset = (-110 if size == rows[0][1] else 6, 6 + 10 * (i % 2))  # keep labels apart
        b.annotate(name, (size / 1e6, p), xytext=offset, textcoords="offset points", fontsize=8)
    b.set(xlabel="size (MB)", ylabel="held-out perplexity per byte", title="size vs quality")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
