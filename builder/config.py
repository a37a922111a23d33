"""Training and quantization settings, named presets, and `--set section.field=value` overrides.

A `Preset` bundles one frozen dataclass per concern: the model and evaluation configs live in the
runtime (they ship in the artifact); training and quantization settings stay here. Each field's
docstring is its documentation, read back by `field_docs` for `--help` and `pgbuild presets`.
"""

import ast
import dataclasses
import inspect
import json
import textwrap
from dataclasses import dataclass, field, fields, replace
from functools import cache

from runtime.config import ConfigBase, EvalConfig, ModelConfig
from runtime.errors import PgError


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    seed: int = 1337
    """Seed for weight init and data order."""
    iterations: int = 20000
    """Step cap; the wallclock cap usually ends training first."""
    max_wallclock_seconds: float = 600.0
    """The challenge's training budget; the LR schedule runs on the fraction of it used."""
    reserve_seconds: float = 12.0
    """Seconds kept back from the wallclock for Hessians and GPTQ."""
    batch_tokens: int = 786432
    """Tokens per optimizer step across all ranks."""
    micro_batch_tokens: int = 98304
    """Tokens per forward/backward on one rank; the rest of the batch is gradient accumulation."""
    seq_len: int = 2048
    """Training sequence length."""
    matrix_lr: float = 0.022
    """Muon learning rate for the block matrices."""
    embed_lr: float = 0.03
    """AdamW learning rate for the token embedding (and an untied head)."""
    scalar_lr: float = 0.02
    """AdamW learning rate for control tensors (scales, gains, mixes, skips)."""
    embed_weight_decay: float = 0.085
    """AdamW weight decay on the embedding."""
    scalar_weight_decay: float = 0.02
    """AdamW weight decay on control tensors."""
    muon_weight_decay: float = 0.095
    """Decoupled Muon weight decay, multiplied by the scheduled LR."""
    adam_betas: tuple = (0.9, 0.95)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    muon_momentum: float = 0.99
    """Muon Nesterov momentum after warmup."""
    muon_momentum_warmup_start: float = 0.92
    """Muon momentum at step 0, ramped linearly to muon_momentum."""
    muon_momentum_warmup_steps: int = 1500
    """Steps of the momentum ramp."""
    newton_schulz_steps: int = 5
    """Newton-Schulz iterations per Muon update."""
    newton_schulz_coefficients: str = "classic"
    """'classic' (3.4445, -4.775, 2.0315) or 'polar_express' (one tuple per step)."""
    warmdown_frac: float = 0.72
    """Final fraction of training over which the LR decays linearly."""
    min_lr: float = 0.0
    """Floor of the LR multiplier during warmdown."""
    ema_decay: float = 0.9965
    """EMA of all weights, updated every step; the EMA is what gets quantized. 0 disables."""
    grad_clip: float = 0.3
    """Global gradient-norm clip; 0 disables."""
    enable_looping_at: float = 0.35
    """Training fraction at which depth recurrence switches on."""
    compile: bool = True
    """torch.compile the model (GPU only; CPU runs eager)."""
    compile_warmup_steps: int = 20
    """GPU: steps run before and after looping to prime compilation; weights and optimizer state
    are then restored."""
    log_every: int = 50
    """Steps between training-loss log lines."""
    require_cuda: bool = False
    """Refuse to run without a GPU (the record preset is meaningless on CPU)."""


@dataclass(frozen=True)
class QuantConfig(ConfigBase):
    matrix_bits: int = 6
    """Bit width of the block matrices' codes."""
    matrix_clip_k: float = 12.85
    """SDClip for matrices: row scale = k * std(row) / (2^(bits-1) - 1)."""
    embed_bits: int = 8
    """Bit width of the token embedding's codes."""
    embed_clip_k: float = 20.0
    """SDClip k for the token embedding."""
    passthrough_max_numel: int = 65536
    """Float tensors this small (and all 1-D ones) are stored as fp16, unquantized."""
    min_bits: int = 2
    """Lowest bit width the budget fitter may give a tensor."""
    calibration_batches: int = 64
    """Training batches whose activations form the GPTQ Hessians (never validation data)."""
    calibration_batch_tokens: int = 786432
    """Tokens per calibration batch."""
    gptq_block: int = 128
    """GPTQ column block size."""
    gptq_damp: float = 0.01
    """GPTQ damping, as a fraction of mean(diag H)."""
    act_order: bool = True
    """GPTQ quantizes columns in order of decreasing Hessian diagonal."""
    codecs: tuple = ("brotli", "lzma")
    """Codecs tried on every weight stream; the smallest output wins."""
    budget_bytes: int = 16_000_000
    """Hard cap on the artifact file's size in bytes."""


@dataclass(frozen=True)
class Preset(ConfigBase):
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def from_dict(cls, values):
        unknown = sorted(set(values) - set(SECTIONS))
        if unknown:
            raise PgError(f"unknown config section(s) {', '.join(unknown)}; use {', '.join(SECTIONS)}")
        return cls(**{name: SECTIONS[name].from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()})
                      for name, sub in values.items()})

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=1)


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "quant": QuantConfig, "eval": EvalConfig}


def _tiny():
    """CPU-sized: trains in about a minute on two cores and still has every record feature."""
    return Preset(
        model=ModelConfig(vocab_size=1024, num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2,
                          loop_start=1, loop_end=2, num_loops=1, parallel_residual_start=3, xsa_last_n=4),
        train=TrainConfig(iterations=300, max_wallclock_seconds=90.0, reserve_seconds=0.0, batch_tokens=4096,
                          micro_batch_tokens=4096, seq_len=128, matrix_lr=0.03, embed_lr=0.05,
                          muon_momentum_warmup_steps=50, ema_decay=0.98, warmdown_frac=0.5, log_every=25),
        quant=QuantConfig(calibration_batches=8, calibration_batch_tokens=4096, gptq_block=64, passthrough_max_numel=4096),
        eval=EvalConfig(seq_len=128, stride=32, batch_seqs=32, ttt_chunk_tokens=4096, ttt_epochs=1,
                        ttt_lr=0.002, ttt_batch_seqs=8),
    )


PRESETS = {
    "record": lambda: Preset(train=TrainConfig(require_cuda=True)),
    "tiny": _tiny,
}


def get_preset(name):
    if name not in PRESETS:
        raise PgError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def _parse_value(text, current):
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if isinstance(current, tuple):
        return tuple(type(current[0])(part) if current else part for part in text.split(","))
    return type(current)(text)


def apply_overrides(preset, assignments):
    """Apply `section.field=value` strings, e.g. `model.num_layers=4`, `train.iterations=50`.
    Each section is rebuilt once with all its changes, so its validation sees the final values."""
    changes = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        section, dot, name = key.strip().partition(".")
        sub = getattr(preset, section, None) if dot else None
        if not sep or not isinstance(sub, ConfigBase) or name not in {f.name for f in fields(sub)}:
            raise PgError(f"--set {assignment!r}: expected section.field=value with a field listed by `pgbuild presets`")
        current = getattr(sub, name)
        try:
            changes.setdefault(section, {})[name] = _parse_value(text.strip(), current)
        except ValueError:
            raise PgError(f"--set {assignment!r}: {text!r} is not a valid {type(current).__name__}") from None
    return replace(preset, **{section: replace(getattr(preset, section), **values) for section, values in changes.items()})


@cache
def field_docs(config_cls):
    """{field: docstring} from the string literals that follow each field in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(config_cls)))
    body, docs = tree.body[0].body, {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs
