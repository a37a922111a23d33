"""Training and quantization settings, named presets, and `--set section.field=value` overrides.

A `Preset` bundles one frozen dataclass per concern: the model and evaluation configs live in the
runtime (they ship in the artifact); training and quantization settings stay here. Each field's
docstring is its documentation, read back by `field_docs` for `--help` and `pgbuild presets`.
"""

import ast
import inspect
import textwrap
from dataclasses import dataclass, field, fields, replace
from functools import cache

from runtime.artifact import BUDGET_BYTES
from runtime.config import ConfigBase, EvalConfig, ModelConfig, require
from runtime.errors import PgError

TIME_RULE_NAMES = ("strict", "data_access")
"""Keys of builder.timebudget.TIME_RULES (named here so configs load without torch)."""
NEWTON_SCHULZ_NAMES = ("classic", "polar_express")
"""Coefficient sets of builder.train.optim.NEWTON_SCHULZ (named here so configs load without torch)."""


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    seed: int = 1337
    """Seed for weight init and data order."""
    iterations: int = 20000
    """Step cap; the wallclock cap usually ends training first."""
    max_wallclock_seconds: float = 600.0
    """The challenge's limit on training plus the stages that make the artifact (which ones:
    time_rule); training gets it minus the reserve, and the LR schedule runs on the fraction of
    that used."""
    time_rule: str = "strict"
    """Which stages count against max_wallclock_seconds: 'strict' (training, Hessians, GPTQ +
    budget fit, compression and writing the file, as the organizers re-run records) or
    'data_access' (training and Hessian collection, the stages that read training data, as the
    2026-04-29 record read the rule). A build over the limit is an error unless --allow-overtime."""
    reserve_seconds: float = 12.0
    """Seconds of the limit kept back for the counted post-training stages, at least (the build's
    summary records what they took)."""
    auto_reserve: bool = True
    """Reserve the larger of reserve_seconds and a measured estimate of the counted post-training
    stages (one calibration batch, GPTQ + compression of one matrix per shape, scaled up), taken
    off the clock once the clock rather than the step cap may end training."""
    batch_tokens: int = 786432
    """Tokens per optimizer step across all ranks."""
    micro_batch_tokens: int = 98304
    """Tokens per forward/backward on one rank, at most; the rest of the batch is gradient
    accumulation. On more ranks than batch_tokens / micro_batch_tokens, each rank's whole share is
    one micro-batch, so the tokens per step stay the same."""
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
    muon_wd_taper: bool = False
    """Taper Muon's weight decay late in training (2026-04-18): its multiplier falls linearly
    from 1 at muon_wd_taper_start to muon_wd_taper_final at the end."""
    muon_wd_taper_start: float = 0.70
    """Training fraction where the weight-decay taper begins."""
    muon_wd_taper_final: float = 0.5
    """Weight-decay multiplier at the end of training, with the taper on."""
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
    """EMA of all weights, updated every step; the EMA is what gets quantized (unless SWA took a
    snapshot). 0 disables."""
    swa_every: int = 0
    """SWA: steps between snapshots of the weights, averaged uniformly; when it took any, the
    SWA average (not the EMA) is what gets quantized. 0 disables."""
    swa_start_frac: float = 0.85
    """SWA: training fraction from which snapshots are taken (PR #456: step 4650 of ~5200)."""
    qat_threshold: float = 0.0
    """Late QAT: once lr_mul falls below this, the block matrices train through the export's
    quantization grid (straight-through); the records used 0.15. 0 disables."""
    qat_scale: str = "sdclip"
    """Late QAT row scale: 'sdclip' (the exporter's k*std/qmax at the recipe's bits and k) or
    'rowmax' (rowmax/qmax); codes are clamped to the export's symmetric +-qmax either way."""
    grad_clip: float = 0.3
    """Global gradient-norm clip; 0 disables."""
    enable_looping_at: float = 0.35
    """Training fraction at which depth recurrence switches on."""
    compile: bool = True
    """torch.compile the training forward as the record does (fullgraph, static shapes: one graph
    with depth recurrence off, one with it on). On the GPU; on the CPU only with compile_cpu."""
    compile_cpu: bool = False
    """Compile on the CPU too (inductor, C++ via gcc): tens of seconds per graph before the first
    step, which short CPU runs (the tiny preset, the tests) never earn back; off, the CPU runs eager."""
    fused_loss: bool = True
    """The softcapped cross-entropy as one Triton kernel each way (builder/train/fused_loss.py), as
    the 2026-04-27 record trains: the eager loss's math without its (tokens x vocab) fp32 capped
    logits. Used where Triton and CUDA are present and the model caps its logits in fp32
    (logit_softcap > 0, no record_precision); elsewhere the eager loss."""
    fused_mlp: bool = True
    """The MLP's up-projection with its LeakyReLU² (or relu²) in the matmul's epilogue, one Triton
    kernel each way (builder/train/fused_mlp.py), as the 2026-04-27 record trains. Used where
    Triton and CUDA are present, for those activations, without late QAT (whose fake-quant
    weights it would bypass) or record_precision; elsewhere the model's own MLP."""
    compile_backend: str = "inductor"
    """torch.compile backend; 'aot_eager' traces the same graphs (forward and backward) without
    generating code: seconds instead of minutes, for tests and for bisecting a compiler problem."""
    compile_warmup_steps: int = 20
    """When compiled: steps run before and after looping to prime compilation; weights and
    optimizer state are then restored."""
    log_every: int = 50
    """Steps between training-loss lines on the console; the run log (train_log.jsonl, loss.png)
    records every min(log_every, iterations // 50) steps, so a short run still has ~50 points."""
    require_cuda: bool = False
    """Refuse to run without a GPU (the record preset is meaningless on CPU)."""
    checkpoint_every: int = 0
    """Steps between resumable checkpoints (weights, optimizers, averages, data order, step,
    clock) written over `pgbuild train --out`, or the run folder's checkpoint.pt; 0: only at the
    end. Writing them is off the training clock."""

    def __post_init__(self):
        if self.newton_schulz_coefficients not in NEWTON_SCHULZ_NAMES:
            raise PgError(f"train.newton_schulz_coefficients must be one of {', '.join(NEWTON_SCHULZ_NAMES)}")
        require(self.time_rule in TIME_RULE_NAMES,
                f"train.time_rule must be one of {', '.join(TIME_RULE_NAMES)}, got {self.time_rule!r}")
        if self.qat_scale not in ("sdclip", "rowmax"):
            raise PgError("train.qat_scale must be 'sdclip' or 'rowmax'")
        require(0 <= self.muon_wd_taper_start < 1,
                f"train.muon_wd_taper_start must be in [0, 1), got {self.muon_wd_taper_start}")
        require(0 <= self.swa_start_frac <= 1, f"train.swa_start_frac must be in [0, 1], got {self.swa_start_frac}")
        for name in ("iterations", "log_every"):
            require(getattr(self, name) >= 1, f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("swa_every", "checkpoint_every"):
            require(getattr(self, name) >= 0, f"train.{name} must be at least 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class QuantConfig(ConfigBase):
    matrix_bits: int = 6
    """Bit width of the block matrices' codes."""
    matrix_clip_k: float = 12.85
    """SDClip for attention matrices: row scale = k * std(row) / (2^(bits-1) - 1)."""
    mlp_clip_k: float = 12.85
    """SDClip k for MLP matrices."""
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
    codecs: tuple = ("brotli", "lzma", "rans")
    """Codecs tried on every weight stream; the smallest output wins. "rans" is pgbuild's own
    static-model coder (builder/artifact/entropy.py), smallest on most integer code streams."""
    codec_sample_bytes: int = 262_144
    """A weight stream of at least 4x this many bytes is compressed in full only with the codecs
    whose output on a sample of this size (4 evenly spaced slices) is within 1% of the best one's;
    0 compresses every stream with every codec."""
    reorder_groups: tuple = ("tok_emb",)
    """Matrix groups whose code streams are also tried with rows in greedy L1 nearest-neighbour
    order and transposed (the top record does tok_emb, attn_q and mlp_fc); the smaller layout wins,
    row orders counted. The search costs O(rows^2 x cols) per matrix and only pays where rows
    resemble each other, as a trained embedding's do."""
    budget_bytes: int = BUDGET_BYTES
    """Hard cap on the artifact file's size in bytes."""
    hessian_clip_lambda: float = 0.0
    """Hessian-aware SDClip: row scales grow by 1 + lambda*(r_i - 1) with r_i the row's
    Hessian-weighted magnitude (normalized to mean 1); 0 is plain SDClip, PR #1412 used 0.175."""
    clip_search: tuple = ()
    """Multipliers of each tensor's clip k to try (GPTQ-lite style); the one with the least
    Hessian-weighted error at each bit width wins. Empty: use k as given."""
    control_int8: bool = False
    """Store control tensors as int8 with one scale, and small matrices as int8 rows (PR #1716's
    Path A v3), instead of fp16."""
    gate_int8_rows: bool = False
    """Store the attention gates (attn.gate_w) as int8 rows with an fp16 absmax/127 scale each,
    the other control tensors staying fp16 (the 2026-04-27 record's GATED_ATTN_QUANT_GATE)."""
    allocation: str = "fit"
    """'fit': the recipe's bit widths, lowered only where needed to fit the budget; 'rd':
    rate-distortion allocation of bit widths (and clip k, transforms) that minimizes total
    Hessian-weighted error for the budget."""
    rd_bits: tuple = (3, 4, 5, 6, 7, 8)
    """Bit widths the rate-distortion allocator may choose from."""
    probe_tokens: int = 65536
    """Training tokens on which the allocator measures each tensor's loss increase per unit of
    Hessian-weighted error (one forward per tensor); 0 trusts the raw Hessian errors."""
    transforms: tuple = ()
    """Alternative encodings the allocator may pick per tensor: 'hadamard', 'awq'."""
    lqer_rank: int = 0
    """LQER: rank of the low-rank correction of the largest quantization errors; 0 disables."""
    lqer_top: int = 3
    """LQER: how many matrices (largest error first) get a correction."""
    prune_fractions: tuple = ()
    """Selective ±1 pruning as allocator candidates: fractions of a candidate's ±1 codes to zero
    after GPTQ, cheapest first by Hessian-weighted cost s_i² H_jj; each fraction adds a pruned
    copy of every rate-distortion candidate. Empty: no pruned candidates."""
    prune_to_fit: float = 0.0
    """Selective ±1 pruning to fit the budget: when the packed artifact is over budget, zero the
    globally cheapest ±1 codes (binary search on their count, each step packed for real), up to
    this fraction of all ±1 codes; tried before each bit-width step of the 'fit' allocation, and
    on the closest 'rd' allocation when none fits. 0 disables."""


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
        return cls(**{name: SECTIONS[name].from_dict({k: tuple(v) if isinstance(v, list) else v
                                                      for k, v in sub.items()})
                      for name, sub in values.items()})


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "quant": QuantConfig, "eval": EvalConfig}


def parse_value(text, current):
    """`text` as a value of `current`'s type (bools as 1/0, true/false, yes/no, on/off; tuples comma-separated)."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if isinstance(current, tuple):
        return tuple(type(current[0])(p) if current else _guess(p) for p in text.split(",") if p)
    return type(current)(text)


def _guess(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def apply_overrides(preset, assignments):
    """Apply `section.field=value` strings, e.g. `model.num_layers=4`, `train.iterations=50`.
    Each section is rebuilt once with all its changes, so its validation sees the final values."""
    changes = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        section, dot, name = key.strip().partition(".")
        sub = getattr(preset, section, None) if dot else None
        if not sep or not isinstance(sub, ConfigBase) or name not in {f.name for f in fields(sub)}:
            raise PgError(f"--set {assignment!r}: expected section.field=value "
                          "with a field listed by `pgbuild presets`")
        current = getattr(sub, name)
        try:
            changes.setdefault(section, {})[name] = parse_value(text.strip(), current)
        except ValueError:
            raise PgError(f"--set {assignment!r}: {text!r} is not a valid {type(current).__name__}") from None
    return replace(preset, **{section: replace(getattr(preset, section), **values)
                              for section, values in changes.items()})


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
