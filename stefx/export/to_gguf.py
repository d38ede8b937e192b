"""GGUF (llama.cpp's file format) for Llama-family models, on the lattice stefx trained.

``stefx.export(qmodel, "model.gguf", format="gguf")`` writes one GGUF file with the ``gguf``
package (llama.cpp's own Python writer): the architecture's metadata, a tokenizer, and
every tensor under llama.cpp's name. A fake-quantized weight is stored in the GGML type
whose lattice it trained on, bit for bit:

==========  ==============================================  =============================
GGML type   block                                           stefx lattice (preset)
==========  ==============================================  =============================
``Q8_0``    32 int8 codes along the input, one fp16 scale   8-bit symmetric, scales in
                                                            fp16 (``gguf-q8_0``)
``Q4_0``    32 codes in [-8, 7], one fp16 scale             4-bit symmetric, scales in
                                                            fp16 (``gguf-q4_0``)
``TQ2_0``   256 ternary codes in 2 bits, one fp16 scale     ternary, scales in fp16
``TQ1_0``   the same in 1.69 bits (base-3 packing)          (``gguf-tq2_0``)
==========  ==============================================  =============================

A lattice fits when its scale groups are whole blocks (per tensor, per output channel, or
groups along the input that a block divides), it has no zero point, and its scales are
fp16 numbers. Each block's bytes are written from stefx's own codes and scales and then
checked: ``gguf.quants.dequantize`` of every quantized tensor must give back stefx's
dequantized weight exactly, or nothing is written. Other tensors (embeddings, norms,
``lm_head``) go as F16 (``float_type="f16"``, what llama.cpp's converter writes) or F32.

A layer that does not fit is refused, naming it, the mismatch and the preset that fits;
with ``strict=False`` it is re-quantized from its fake-quantized weight by llama.cpp's own
rounding (``gguf.quants.quantize``: Q8_0 for 8-bit, TQ2_0/TQ1_0 for ternary and binary,
Q4_0 for the rest; F16 where a row is not whole blocks), and a warning gives each such
layer's error. Activations: llama.cpp's CPU path quantizes the input of a ``Q4_0`` or
``Q8_0`` matmul to ``Q8_0`` blocks (32 along the input, fp16 scale) and of a ``TQ2_0`` one
to ``Q8_K`` (256, fp32 scale); the ``gguf-*`` presets train with those lattices. A model
trained with activations of fewer than 8 bits would be served with 8-bit ones: refused.

The tokenizer: a byte-level vocabulary (token i is byte i, llama.cpp's ``<0xNN>`` byte
tokens; ids past 255 are unused) for a model with no tokenizer of its own, such as
stefx's demo LM. Q and K projections are permuted as llama.cpp's converter does (its
rotary embedding pairs adjacent dimensions; Hugging Face's pairs the two halves): a row
permutation, which moves whole blocks and changes no value.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stefx.convert import ConvertError, PackedWeight
from stefx.export.common import RequantizedWarning, float_state, refuse

__all__ = ["GGUF_TYPES", "write_gguf"]

#: stefx lattice -> GGML type name, and each type's block size
GGUF_TYPES = {"Q8_0": 32, "Q4_0": 32, "TQ2_0": 256, "TQ1_0": 256}
_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "llama"}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",  # a MoE router
    "mlp.experts": "",  # fused experts: see _split
}
_TOP_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
_FITS = {"Q8_0": "gguf-q8_0", "Q4_0": "gguf-q4_0", "TQ2_0": "gguf-tq2_0", "TQ1_0": "gguf-tq2_0"}


def write_gguf(
    model: nn.Module,
    path: Path,
    *,
    strict: bool = True,
    ternary: str = "tq2_0",
    float_type: str = "f16",
) -> Path:
    """Write ``model`` (a stefx-quantized Llama-family causal LM) to the GGUF file ``path``."""
    gguf = _import_gguf()
    from stefx.api import target_of

    if ternary not in ("tq2_0", "tq1_0"):
        raise ConvertError(f"export gguf: ternary={ternary!r}; choose 'tq2_0' or 'tq1_0'")
    if float_type not in ("f16", "f32"):
        raise ConvertError(f"export gguf: float_type={float_type!r}; choose 'f16' or 'f32'")
    if not isinstance(model, nn.Module):
        raise ConvertError(f"export gguf: model={type(model).__name__} is not a torch.nn.Module")
    base = target_of(model)
    arch = _ARCHS.get(type(base).__name__)
    if arch is None:
        raise ConvertError(
            f"export gguf: {type(base).__name__} is not a model the GGUF writer maps (it "
            f"writes {sorted(_ARCHS)} as llama.cpp's 'llama' architecture)"
        )
    cfg = base.config
    _check_config(cfg)
    work = copy.deepcopy(base).eval()
    plan, problems = _plan(work, ternary.upper())
    if problems and strict:
        raise refuse("gguf", problems)
    tensors, report = _tensors(work, plan, cfg, ternary.upper(), float_type, gguf)
    if report:
        lines = [
            f"{k}: -> {t}, max |Δ| {e:.3g}, rel. RMS {r:.3g}" for k, (t, e, r) in report.items()
        ]
        warnings.warn(
            "export gguf: strict=False re-quantized " + "; ".join(lines),
            RequantizedWarning,
            stacklevel=3,
        )
    _write(path, arch, cfg, tensors, report, gguf)
    return path


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ConvertError(
            "export gguf: the gguf package is not installed; pip install 'stefx[export]'"
        ) from None
    return gguf


def _check_config(cfg) -> None:
    rope = getattr(cfg, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise ConvertError(
            f"export gguf: rope_type={kind!r}; the writer stores plain RoPE (rope_type "
            "'default') only"
        )
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ConvertError("export gguf: attention_bias/mlp_bias models are not mapped yet")


def _gguf_name(key: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``; fused
    experts ``model.layers.3.mlp.experts.down_proj`` -> ``blk.3.ffn_down_exps.weight``
    (``gate_up_proj`` -> ``blk.3.ffn_gate_up_exps.weight``, split by :func:`_split`)."""
    module, _, leaf = key.rpartition(".")
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{leaf}"
    parts = module.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 3:
        inner = ".".join(parts[3:])
        if inner == "mlp.experts" and leaf in ("gate_up_proj", "down_proj"):
            return f"blk.{parts[2]}.ffn_{leaf[:-5]}_exps.weight"
        if _LAYER_NAMES.get(inner):
            return f"blk.{parts[2]}.{_LAYER_NAMES[inner]}.{leaf}"
    raise ConvertError(f"export gguf: tensor {key!r} has no name in llama.cpp's llama layout")


def _split(name: str, arr: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Fused ``gate_up`` experts [E, 2·I, ...] -> llama.cpp's ``ffn_gate_exps`` and
    ``ffn_up_exps`` [E, I, ...] (transformers computes ``gate, up = chunk(2)``: gate first);
    whole rows move, so blocks are unchanged."""
    if not name.endswith("ffn_gate_up_exps.weight"):
        return [(name, arr)]
    half = arr.shape[1] // 2
    prefix = name.removesuffix("gate_up_exps.weight")
    return [
        (f"{prefix}gate_exps.weight", arr[:, :half]),
        (f"{prefix}up_exps.weight", arr[:, half:]),
    ]


def _target(spec, ternary: str) -> str:
    """The GGML type a lattice goes to (exactly, or re-quantized under strict=False)."""
    if spec.type in ("ternary", "binary"):
        return ternary
    return "Q8_0" if spec.num_bits >= 8 else "Q4_0"


def _lattice_problem(spec, shape, module, state, block: int, target: str) -> str | None:
    """Why a weight's spec is not the ``target`` type's lattice (None: it is, given fp16
    scales, which are checked on the converted values)."""
    kind = {"ternary": "ternary", "binary": "binary"}.get(spec.type, f"{spec.num_bits}-bit")
    if spec.type not in ("uniform", "lsq", "ternary") or (
        spec.type == "ternary" and spec.scale not in ("absmean", "twn")
    ):
        return f"a {spec.type} {spec.scale} lattice ({kind}), which no GGUF type holds"
    if spec.type != "ternary" and spec.num_bits not in (4, 8):
        return f"{spec.num_bits}-bit codes; GGUF's block types here hold 4 or 8 bits"
    if not spec.symmetric:
        return "a zero point; Q4_0/Q8_0 are symmetric"
    if len(shape) not in (2, 3) or (len(shape) == 3 and spec.strategy == "channel"):
        return (
            f"a {len(shape)}-d weight per {spec.strategy}; the writer maps 2-d weights and "
            "fused [experts, out, in] ones with scales along the input"
        )
    if shape[-1] % block:
        return f"{shape[-1]} inputs, not whole {target} blocks of {block}"
    s, axis = spec.strategy, spec.axis
    if s == "group" and (axis not in (None, -1, 1) or spec.group_size % block):
        return f"scale groups of {spec.group_size} along axis {axis}, not whole blocks of {block}"
    if s == "channel" and axis not in (None, 0):
        return "per-channel scales along the input; a block's scale runs along it"
    if s == "token":
        return "per-row scales of a fused weight"
    acts = [module._modules[n] for n in (state.input, state.output) if n is not None]
    if state.op_table:
        acts += list(module._modules["op_quantizers"].values())
    for a in acts:
        if a.enabled and (a.spec.type != "uniform" or a.spec.num_bits < 8):
            return (
                f"{a.spec.num_bits}-bit {a.spec.type} activations; llama.cpp computes 8-bit "
                "ones, which the model was not trained for"
            )
    return None


def _plan(work: nn.Module, ternary: str) -> tuple[dict, list[str]]:
    """Each quantized weight's FQN -> (module, quantizer name, GGML type, exact?), after
    converting the copy's exact ones; and the problems of the others."""
    from stefx.convert import convert
    from stefx.rewrite import STATE_ATTR, quantized_modules

    plan, problems, exact = {}, [], []
    for fqn, module in quantized_modules(work).items():
        state = module.__dict__[STATE_ATTR]
        for p, qname in state.swaps.items():
            q = module._modules[qname]
            if not q.enabled:
                continue
            name = f"{fqn}.{p}"
            shape = q.weight_shape if isinstance(q, PackedWeight) else module.get_parameter(p).shape
            target = _target(q.spec, ternary)
            problem = _lattice_problem(q.spec, shape, module, state, GGUF_TYPES[target], target)
            if problem is None and (state.call_weights or state.fold.get(p)):
                problem = "a weight quantized per call or with a folded BatchNorm"
            plan[name] = [module, qname, target, problem is None]
            if problem:
                problems.append(f"{name}: {problem}; the preset that fits: {_FITS[target]}")
            elif not isinstance(q, PackedWeight):
                exact.append(name)
    if exact:
        convert(work, only=exact)
    for name, entry in plan.items():
        module, qname, target, ok = entry
        packed = module._modules[qname]
        if ok and not torch.equal(packed.scale, packed.scale.half().float()):
            entry[3] = False
            dtype = packed.spec.options.get("scale_dtype", "float32")
            problems.append(
                f"{name}: its scales are {dtype} numbers, {target} stores fp16 ones; train "
                f"with scale_dtype: float16 (the preset that fits: {_FITS[target]})"
            )
    return plan, problems


def _permutation(name: str, rows: int, cfg) -> torch.Tensor | None:
    """The row order llama.cpp wants for a Q or K projection (None: keep it)."""
    if name.endswith("self_attn.q_proj.weight"):
        heads = cfg.num_attention_heads
    elif name.endswith("self_attn.k_proj.weight"):
        heads = cfg.num_key_value_heads or cfg.num_attention_heads
    else:
        return None
    idx = torch.arange(rows)
    return idx.reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def _block_scales(packed: PackedWeight, block: int) -> torch.Tensor:
    """(rows, cols / block) fp32: the scale of each block (its group's); rows are all
    but the last dimension."""
    shape = packed.weight_shape
    gran = packed.granularity
    rows_shape = gran.rows_shape(shape)
    per_element = gran.unrows(packed.scale.unsqueeze(1).expand(rows_shape), shape)
    return per_element.reshape(-1, shape[-1] // block, block)[..., 0].float()


def _blocks(codes: torch.Tensor, d: torch.Tensor, kind: str, gguf) -> np.ndarray:
    """Bytes (..., row bytes) of one tensor in GGML type ``kind`` from integer codes
    (..., cols) and block scales (rows, cols / block)."""
    lead = codes.shape[:-1]
    codes = codes.reshape(-1, codes.shape[-1])
    rows, cols = codes.shape
    block = GGUF_TYPES[kind]
    c = codes.reshape(rows, cols // block, block).to(torch.int16)
    d16 = d.to(torch.float16).numpy().view(np.uint8).reshape(rows, -1, 2)
    if kind == "Q8_0":  # d, then 32 int8
        qs = c.to(torch.int8).numpy().view(np.uint8)
        out = np.concatenate([d16, qs], axis=-1)
    elif kind == "Q4_0":  # d, then byte j = (q_j + 8) | (q_{j+16} + 8) << 4
        u = (c + 8).to(torch.uint8).numpy()
        qs = u[..., :16] | (u[..., 16:] << np.uint8(4))
        out = np.concatenate([d16, qs], axis=-1)
    elif kind == "TQ2_0":  # 64 bytes: in each half of 128, byte j holds codes j + 32k, k < 4
        u = (c + 1).to(torch.uint8).numpy().reshape(rows, -1, 2, 4, 32)
        qs = u[..., 0, :] | (u[..., 1, :] << 2) | (u[..., 2, :] << 4) | (u[..., 3, :] << 6)
        out = np.concatenate([qs.reshape(rows, -1, 64), d16], axis=-1)
    else:  # TQ1_0's base-3 packing: llama.cpp's quantizer of c·d is exact (d = max|c·d|)
        values = (c.float() * d.to(torch.float16).float().unsqueeze(-1)).reshape(rows, cols)
        out = gguf.quants.quantize(values.numpy(), gguf.GGMLQuantizationType.TQ1_0)
    return out.reshape(*lead, -1)


def _quantized(name, module, q, kind: str, exact: bool, cfg, gguf):
    """(bytes in llama.cpp's row order, GGML type, strict=False report entry or None) of
    one quantized weight: stefx's own codes and scales when ``exact`` (checked to
    dequantize to the trained weight), else llama.cpp's rounding of the fake-quantized one."""
    if exact:
        arr, values = _blocks(q.int_codes(), _block_scales(q, GGUF_TYPES[kind]), kind, gguf), None
        want = q.dequantized().float()
    else:
        with torch.no_grad():
            fake = (
                q.dequantized()
                if isinstance(q, PackedWeight)
                else q(module.get_parameter(name.rpartition(".")[2]))
            )
        want = fake.detach().float()
        if want.shape[-1] % GGUF_TYPES[kind]:
            kind, arr = "F16", want.numpy().astype(np.float16)
        else:
            arr = gguf.quants.quantize(want.numpy(), getattr(gguf.GGMLQuantizationType, kind))
        values = _dequantize(arr, kind, want.shape, gguf)
    perm = _permutation(name, want.shape[0], cfg)
    if perm is not None:
        arr, want = arr[perm.numpy()], want[perm]
        values = None if values is None else values[perm]
    if values is not None:  # strict=False: how far llama.cpp's rounding moved the weight
        diff = values - want
        rel = diff.pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-30)
        return arr, kind, (kind, diff.abs().max().item(), rel.item())
    back = _dequantize(arr, kind, want.shape, gguf)
    if not torch.equal(back, want):  # a bug in stefx, never a silent change
        raise ConvertError(
            f"export gguf: {name}: {kind} blocks do not dequantize to the trained weight "
            f"({(back != want).sum().item()} values differ); nothing written"
        )
    return arr, kind, None


def _tensors(work, plan, cfg, ternary, float_type, gguf):
    """GGUF name -> (array, GGML type or None) for every tensor; the strict=False report."""
    qtype = gguf.GGMLQuantizationType
    state = float_state(work)
    tied = getattr(cfg, "tie_word_embeddings", False)
    out: dict[str, tuple[np.ndarray, object]] = {}
    report: dict[str, tuple[str, float, float]] = {}
    for name, (module, qname, kind, exact) in plan.items():
        arr, kind, entry = _quantized(name, module, module._modules[qname], kind, exact, cfg, gguf)
        if entry is not None:
            report[name] = entry
        for gname, part in _split(_gguf_name(name), arr):
            out[gname] = (part, None if kind == "F16" else getattr(qtype, kind))
        state.pop(name, None)
    for key, value in state.items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reads token_embd when output.weight is absent
        gname = _gguf_name(key)
        if gname in out:
            continue
        v = value.detach().float()
        # norms and the router stay F32, as llama.cpp's converter writes them
        keep32 = float_type == "f32" or v.dim() == 1 or gname.endswith("ffn_gate_inp.weight")
        perm = _permutation(key, v.shape[0], cfg)
        if perm is not None:
            v = v[perm]
        for part_name, part in _split(gname, v.numpy() if keep32 else v.numpy().astype(np.float16)):
            out[part_name] = (part, None)
    return out, report


def _dequantize(arr: np.ndarray, kind: str, shape, gguf) -> torch.Tensor:
    if kind == "F16":
        return torch.from_numpy(arr.astype(np.float32)).reshape(shape)
    values = gguf.quants.dequantize(arr, getattr(gguf.GGMLQuantizationType, kind))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def _write(path: Path, arch: str, cfg, tensors: dict, report: dict, gguf) -> None:
    """Metadata, tokenizer and tensors into ``path`` (through a temporary file, so a
    failure leaves nothing behind)."""
    if path.is_dir():
        raise ConvertError(f"export gguf: path {str(path)!r} is a folder; give a file name")
    tmp = path.with_name(path.name + ".partial")
    counts: dict[int, int] = {}
    for arr, t in tensors.values():
        if t is not None:
            counts[int(t)] = counts.get(int(t), 0) + arr.size
    ftype = {
        int(gguf.GGMLQuantizationType.Q4_0): gguf.LlamaFileType.MOSTLY_Q4_0,
        int(gguf.GGMLQuantizationType.Q8_0): gguf.LlamaFileType.MOSTLY_Q8_0,
        int(gguf.GGMLQuantizationType.TQ2_0): gguf.LlamaFileType.MOSTLY_TQ2_0,
        int(gguf.GGMLQuantizationType.TQ1_0): gguf.LlamaFileType.MOSTLY_TQ1_0,
    }.get(max(counts, key=counts.get) if counts else -1, gguf.LlamaFileType.MOSTLY_F16)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(getattr(cfg, "_name_or_path", "") or "stefx-export")
        w.add_file_type(int(ftype))
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(heads)
        w.add_head_count_kv(cfg.num_key_value_heads or heads)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 1e4))))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        if getattr(cfg, "num_local_experts", None):
            w.add_expert_count(cfg.num_local_experts)
            w.add_expert_used_count(cfg.num_experts_per_tok)
        _byte_tokenizer(w, cfg, gguf)
        w.add_string("stefx.requantized", json.dumps(report))
        for name, (arr, t) in tensors.items():
            w.add_tensor(name, np.ascontiguousarray(arr), raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConvertError(f"export gguf: cannot write {str(path)!r}: {e}") from None


def _byte_tokenizer(w, cfg, gguf) -> None:
    """Token i < 256 is byte i (llama.cpp's ``<0xNN>`` byte tokens); the rest are unused."""
    n = cfg.vocab_size
    tokens = [f"<0x{i:02X}>" if i < 256 else f"<unused{i - 256}>" for i in range(n)]
    kinds = [gguf.TokenType.BYTE if i < 256 else gguf.TokenType.UNUSED for i in range(n)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n)
    w.add_token_types(kinds)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and 0 <= value < n:
            add(value)
    w.add_add_bos_token(False)
