"""Low-bit fine-tuning of a pretrained transformer, end to end, on 2 CPU cores in minutes.

1. A small Llama built from a config is trained in float on real text: the bytes of
   Python's own documentation (``pydoc_data.topics``), 90% train / 10% held out.
2. For each preset (``bitnet-b158``: ternary weights + 8-bit activations; ``w4a8``): the
   float model is quantized as is (PTQ), then fine-tuned with the straight-through
   estimators through ``transformers.Trainer`` (QAT), once on the plain next-token loss
   and once distilled from the float model (``stefx.trainer.DistillationTrainer``, with
   the quantizers ramped in by ``StrengthRamp``).
3. The float model gets the same number of extra steps, so "float" is not handicapped.
4. The best student is saved with ``save_pretrained``, reloaded with
   ``AutoModelForCausalLM.from_pretrained`` (it comes back quantized, logits identical),
   also round-tripped through ``stefx.save`` / ``stefx.load``, and asked to generate.

    python examples/finetune_lowbit.py            # the full run (a few minutes)
    python examples/finetune_lowbit.py --quick    # a smoke test (seconds)

Perplexity is per byte on the held-out 10%.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import torch
import transformers

import stefx
from stefx.demo import corpus_split, held_out_loss
from stefx.trainer import DistillationTrainer, StrengthRamp


class Windows(torch.utils.data.Dataset):
    """``n`` random byte windows of ``seq`` tokens (fixed seed); labels = inputs."""

    def __init__(self, data: torch.Tensor, seq: int, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, data.numel() - seq, (n,), generator=g).tolist()
        self.data, self.seq = data, seq

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.data[self.starts[i] : self.starts[i] + self.seq]
        return {"input_ids": x, "labels": x}


def perplexity(model: torch.nn.Module, data: torch.Tensor, seq: int) -> float:
    """exp(mean next-byte loss) over consecutive held-out windows."""
    return math.exp(held_out_loss(model, data, seq, batch=16))


def fit(model, train, steps, lr, out, teacher=None, warmup=0, batch=16):
    """``steps`` optimizer steps of ``Trainer`` (or ``DistillationTrainer`` when a teacher
    is given), cosine schedule, AdamW."""
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callbacks = [StrengthRamp(warmup)] if warmup else None
    if teacher is None:
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=train, callbacks=callbacks
        )
    else:
        trainer = DistillationTrainer(
            model=model,
            teacher=teacher,
            alpha=0.9,
            temperature=1.0,
            args=args,
            train_dataset=train,
            callbacks=callbacks,
        )
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # quiet
    trainer.train()
    return model


def build_model(hidden: int, layers: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--presets", default="bitnet-b158,w4a8")
    parser.add_argument("--float-steps", type=int, default=600)
    parser.add_argument("--qat-steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="where to save the student")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    hidden, layers, seq = (64, 2, 64) if args.quick else (192, 4, 128)
    float_steps, qat_steps = (20, 8) if args.quick else (args.float_steps, args.qat_steps)
    t0 = time.perf_counter()

    train_data, held_out = corpus_split()
    if args.quick:
        held_out = held_out[: 16 * seq]
    train = Windows(train_data, seq, n=16 * (float_steps + 2 * qat_steps), seed=0)
    qat_train = Windows(train_data, seq, n=16 * qat_steps, seed=1)
    work = Path(tempfile.mkdtemp(prefix="stefx_example_"))

    model = build_model(hidden, layers)
    n_params = sum(p.numel() for p in model.parameters())
    text_bytes = train_data.numel() + held_out.numel()
    print(f"Llama {n_params / 1e6:.2f}M params; {text_bytes:,} bytes of pydoc text")
    fit(model, train, float_steps, 3e-3, work / "float")
    results = {"float": perplexity(model, held_out, seq)}
    print(f"float after {float_steps} steps: ppl {results['float']:.3f}")

    longer = fit(copy.deepcopy(model), qat_train, qat_steps, 5e-4, work / "float+")
    results["float +extra"] = perplexity(longer, held_out, seq)

    students = {}
    for preset in args.presets.split(","):
        ptq = stefx.quantize(copy.deepcopy(model), preset, report=False)
        results[f"{preset} PTQ"] = perplexity(ptq, held_out, seq)
        qat = fit(ptq, qat_train, qat_steps, 5e-4, work / f"{preset}-qat")
        results[f"{preset} QAT"] = perplexity(qat, held_out, seq)
        kd = stefx.quantize(copy.deepcopy(model), preset, report=False)
        kd = fit(
            kd,
            qat_train,
            qat_steps,
            5e-4,
            work / f"{preset}-kd",
            teacher=model,
            warmup=qat_steps // 10,
        )
        results[f"{preset} QAT+KD"] = perplexity(kd, held_out, seq)
        students[preset] = kd
        print(
            f"{preset}: PTQ {results[f'{preset} PTQ']:.3f}, QAT {results[f'{preset} QAT']:.3f},"
            f" QAT+KD {results[f'{preset} QAT+KD']:.3f}"
        )

    preset, student = next(iter(students.items()))
    out = args.out or work / f"{preset}-student"
    student.save_pretrained(out)
    again = transformers.AutoModelForCausalLM.from_pretrained(out)
    probe = held_out[: 2 * seq].view(2, seq)
    student.eval(), again.eval()
    results["reload identical"] = bool(
        torch.equal(student(input_ids=probe).logits, again(input_ids=probe).logits)
    )
    stefx.save(student, work / "student.safetensors")
    loaded = stefx.load(work / "student.safetensors").eval()
    results["stefx.load identical"] = bool(
        torch.equal(student(input_ids=probe).logits, loaded(input_ids=probe).logits)
    )
    prompt = torch.tensor([list(b"The for statement")])
    text = again.generate(prompt, max_new_tokens=60, do_sample=False)[0]
    results["sample"] = bytes(text.tolist()).decode("utf-8", errors="replace")
    results["seconds"] = time.perf_counter() - t0

    print("\nheld-out perplexity per byte (lower is better)")
    for key, value in results.items():
        if isinstance(value, float) and key != "seconds":
            print(f"  {key:22s} {value:8.3f}")
    print(f"save_pretrained -> from_pretrained identical logits: {results['reload identical']}")
    print(f"stefx.save -> stefx.load identical logits: {results['stefx.load identical']}")
    print(f"{preset} student, reloaded, continues 'The for statement': {results['sample']!r}")
    print(f"{results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
