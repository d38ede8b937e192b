"""transformers.Trainer on a stefx-quantized model: it trains (fp32, bf16 autocast,
gradient checkpointing), checkpoints hold the quantizer state, and a resumed run continues
the uninterrupted run's loss curve."""

from __future__ import annotations

import pytest
import torch

import stefx
from tests.zoo import build

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, seq=16):
        g = torch.Generator().manual_seed(0)
        # a learnable stream: each row counts up from a random start
        start = torch.randint(3, 100, (n, 1), generator=g)
        self.ids = (start + torch.arange(seq)) % 125 + 3

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(preset="w4a8"):
    model, _ = build("llama")
    return stefx.quantize(model, preset, report=False)


def _args(out, steps, **args):
    cfg = dict(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    cfg.update(args)
    return transformers.TrainingArguments(**cfg)


def _trainer(model, out, steps, callbacks=None, **args):
    return transformers.Trainer(
        model=model, args=_args(out, steps, **args), train_dataset=_Tokens(), callbacks=callbacks
    )


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize(
    "args",
    [{}, {"bf16": True}, {"gradient_checkpointing": True}],
    ids=["fp32", "bf16", "grad-ckpt"],
)
def test_trainer_trains_a_quantized_model(tmp_path, args):
    model = _model()
    scale = model.model.layers[0].self_attn.q_proj.weight_quantizer.scale
    before = scale.detach().clone()
    trainer = _trainer(model, tmp_path, steps=12, **args)
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0], losses
    assert not torch.equal(before, scale.detach())  # the learned steps train too
    model.eval()
    prompt = torch.tensor([[5, 6, 7]])
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    no_cache = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(out, no_cache)  # the KV cache changes nothing but speed


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen3", "qwen2_moe", "mixtral"])
def test_plain_loop_loss_falls_and_generate_works(name):
    model, _ = build(name)
    q = stefx.quantize(model, "w4a8", report=False)
    data = _Tokens(n=8)
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in ("input_ids", "labels")}
    opt = torch.optim.AdamW(q.parameters(), lr=5e-3)
    losses = []
    for step in range(12):
        loss = q(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step == 5:  # generate mid-training, then carry on
            q.eval()
            q.generate(batch["input_ids"][:1, :4], max_new_tokens=2, do_sample=False)
            q.train()
    assert losses[-1] < losses[0] - 0.1, losses
    q.eval()
    out = q.generate(batch["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_resume_continues_the_same_loss_curve(tmp_path):
    full = _trainer(_model(), tmp_path / "full", steps=6)
    full.train()
    reference = _losses(full)

    first = _trainer(_model(), tmp_path / "run", steps=6, save_strategy="steps", save_steps=3)
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").is_file()

    fresh = _model()  # a new process would build the model again, then resume
    resumed = _trainer(fresh, tmp_path / "run", steps=6)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = _losses(resumed)  # the checkpoint's history (steps 1-3), then the new steps
    assert len(after) == 6
    # same seed, same batches, the checkpoint's weights, optimizer and quantizer state
    assert after[3:] == pytest.approx(reference[3:], abs=1e-5)
    scale = fresh.model.layers[0].self_attn.q_proj.weight_quantizer.scale
    twin = full.model.model.layers[0].self_attn.q_proj.weight_quantizer.scale
    assert torch.allclose(scale, twin, atol=1e-6)


# -- training utilities ----------------------------------------------------------------------


def test_distillation_loss_is_the_tempered_kl():
    from stefx.train import distillation_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    T = 2.0
    p_t = torch.softmax(t / T, -1)
    kl = (p_t * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(-1)
    assert torch.allclose(distillation_loss(s, t, T), kl.mean() * T**2, atol=1e-6)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    assert torch.allclose(distillation_loss(s, t, T, mask), kl[mask].mean() * T**2, atol=1e-6)
    hs, ht = [torch.ones(2, 3)], [torch.zeros(2, 3)]
    both = distillation_loss(s, t, T, None, hs, ht, hidden_weight=0.5)
    assert torch.allclose(both, kl.mean() * T**2 + 0.5, atol=1e-6)
    with pytest.raises(stefx.StefxError, match="temperature=0"):
        distillation_loss(s, t, 0)
    with pytest.raises(stefx.StefxError, match="share the vocabulary"):
        distillation_loss(s, t[..., :5])


def test_strength_zero_is_the_float_model():
    from stefx.train import set_strength

    model, _ = build("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    float_logits = model(ids).logits
    stefx.quantize(model, "w4a8", report=False)
    set_strength(model, 0.0)
    assert torch.equal(model(ids).logits, float_logits)
    set_strength(model, 1.0)
    assert not torch.equal(model(ids).logits, float_logits)


def test_strength_ramp_callback(tmp_path):
    from stefx.trainer import StrengthRamp

    model = _model()
    probe = model.model.layers[0].self_attn.q_proj.weight_quantizer
    seen = []

    class Record(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(probe.strength)

    trainer = _trainer(model, tmp_path, steps=6, callbacks=[StrengthRamp(4), Record()])
    trainer.train()
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert probe.strength == 1.0
    with pytest.raises(stefx.StefxError, match="warmup_steps=-1"):
        StrengthRamp(-1)


def test_distillation_trainer_learns_from_a_frozen_teacher(tmp_path):
    import copy

    from stefx.trainer import DistillationTrainer

    model, _ = build("llama")
    teacher = copy.deepcopy(model)
    stefx.quantize(model, "w4a8", report=False)
    before = [p.detach().clone() for p in teacher.parameters()]
    args = _args(tmp_path, steps=10)
    trainer = DistillationTrainer(
        model=model,
        teacher=teacher,
        alpha=0.5,
        temperature=2.0,
        args=args,
        train_dataset=_Tokens(),
    )
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    assert all(p.requires_grad for p in teacher.parameters())  # left as the caller had it
    with pytest.raises(stefx.StefxError, match="alpha=2"):
        DistillationTrainer(model=model, teacher=teacher, alpha=2, args=args)


def test_qat_trainer_applies_the_recipes_lr_scales(tmp_path):
    from stefx.trainer import QATTrainer
    from tests.test_presets import SCALED

    model, _ = build("llama")
    q = stefx.quantize(model, SCALED, report=False)
    args = _args(tmp_path, steps=3, weight_decay=0.1, lr_scheduler_type="linear")
    trainer = QATTrainer(model=q, args=args, train_dataset=_Tokens())
    trainer.train()
    opt = trainer.optimizer
    # the schedule's starting rate of each group (LambdaLR keeps it as initial_lr)
    lr = {
        id(p): (g["initial_lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]
    }
    assert set(lr) == {id(p) for p in q.parameters() if p.requires_grad}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(lr)  # each once
    assert lr[id(q.model.layers[0].self_attn.q_proj.weight)] == (5e-3, 0.1)  # Trainer: decays
    assert lr[id(q.model.norm.weight)] == (5e-3, 0.0)  # Trainer's choice: a norm does not
    assert lr[id(q.model.layers[0].mlp.down_proj.weight)] == (pytest.approx(5e-2), 0.1)
    steps = [p for _, p in stefx.train.quantizer_parameters(q)]
    assert steps and all(lr[id(p)] == (pytest.approx(5e-4), 0.0) for p in steps)
    # a model whose recipe sets no scale keeps Trainer's groups as they are
    plain = QATTrainer(model=_model("w8a8"), args=args, train_dataset=_Tokens())
    assert len(plain.create_optimizer().param_groups) == 2
