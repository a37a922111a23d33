"""The model's shape and the evaluation's settings, as frozen dataclasses.

Each field's docstring is its help text: the builder reads these docstrings to document
`--set model.FIELD=VALUE` and `pgbuild presets`. Both configs are stored in the artifact's manifest
and rebuilt from it with `from_dict`, which rejects unknown keys rather than guessing.
"""

from dataclasses import asdict, dataclass, fields

from .errors import PgError

MODES = ("standard", "sliding", "ttt", "lora")
"""The evaluation modes, in the order the build measures and reports them (kept here, free of torch,
so the artifact's `info` and argument parsing never import it)."""
LORA_ORDERS = ("stream", "record")
"""EvalConfig.lora_order's choices."""


def require(condition, message):
    """One check, one message: a refused config names exactly the condition that failed."""
    if not condition:
        raise PgError(message)


class ConfigBase:
    """Dict round-trips for the frozen config dataclasses."""

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PgError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        return cls(**values)


MLP_ACTIVATIONS = ("leaky_relu2", "relu2", "gelu")
ATTN_GATES = ("none", "dense", "sparse", "attn_out")


@dataclass(frozen=True)
class ModelConfig(ConfigBase):
    vocab_size: int = 8192
    """Tokenizer vocabulary size; the embedding has one row per token id."""
    num_layers: int = 11
    """Physical transformer blocks (each owns weights)."""
    model_dim: int = 512
    """Residual stream width."""
    num_heads: int = 8
    """Query heads per attention layer."""
    num_kv_heads: int = 4
    """Key/value heads (grouped-query attention); must divide num_heads."""
    mlp_mult: float = 4.0
    """MLP hidden width as a multiple of model_dim."""
    leaky_relu_slope: float = 0.5
    """Negative slope of the MLP's LeakyReLU, whose output is then squared."""
    rope_dims: int = 16
    """Leading dims of each head that get rotary position encoding (partial RoPE)."""
    rope_base: float = 10000.0
    """RoPE frequency base."""
    rope_yarn_len: int = 0
    """Sequences longer than this evaluate with an NTK-scaled RoPE base ("YaRN" in the records):
    base * (T / rope_yarn_len)^(rope_dims / (rope_dims - 2)). 0 never scales (the 2026-04-27
    record); the 2026-04-09 record scales beyond its 2048 training tokens."""
    qk_gain_init: float = 5.25
    """Initial value of the learned per-head gain applied to the RMS-normed queries."""
    logit_softcap: float = 30.0
    """Logits become c*tanh(z/c); 0 disables the cap."""
    tie_embeddings: bool = True
    """Use the token embedding as the output head."""
    embed_init_std: float = 0.005
    """Standard deviation of the token embedding's normal init."""
    ln_scale: bool = True
    """Scale each block's normed input by 1/sqrt(layer+1)."""
    skip_gates: bool = True
    """U-Net skips blend with a learned sigmoid gate instead of being added."""
    loop_start: int = 3
    """First physical layer of the depth-recurrence segment."""
    loop_end: int = 5
    """Last physical layer (inclusive) of the depth-recurrence segment."""
    num_loops: int = 2
    """Extra passes over the recurrence segment once looping is on (0 disables recurrence)."""
    parallel_residual_start: int = 7
    """From this physical layer on, attention and MLP run side by side (parallel_lanes says how);
    -1 disables."""
    parallel_lanes: int = 1
    """Parallel blocks' form: 1, GPT-J (both read the same input and add to one stream, the
    2026-04-09 record); 2, the 2026-04-27 record's two-lane decoder (decoder layers only: attention
    reads the attention lane, which takes the skips, the MLP reads the MLP lane, each lane keeps
    a learned share of both outputs, and the head reads their mean)."""
    xsa_last_n: int = 11
    """Exclusive self-attention on the last N physical layers: remove each output's component
    along its own token's value."""
    mlp_activation: str = "leaky_relu2"
    """MLP nonlinearity: 'leaky_relu2' (LeakyReLU(leaky_relu_slope) squared, the record), 'relu2'
    (ReLU squared, PR #456) or 'gelu'."""
    bigram_buckets: int = 0
    """BigramHash: rows of a table indexed by a hash of (token, previous token), projected and added
    to the token embedding before the norm (PR #1716: 16384); 0 disables."""
    bigram_dim: int = 32
    """BigramHash: width of the table (PR #1716: 32), projected to model_dim."""
    smear_gate: bool = False
    """SmearGate, BOS-masked (PR #1667/#1855): x_t += lambda*sigmoid(W x_t[:gate_window]) x_(t-1) on the
    token embedding, except where token t is bos_id, so no document reads the one before it."""
    bos_id: int = 1
    """Token id that starts every document; SmearGate never mixes across it."""
    attn_gate: str = "none"
    """Per-head gate on the attention output before its projection: 'none'; 'dense' sigmoid(W x)
    (PR #1736); 'sparse' sigmoid(0.5 W x[:gate_window]) (PR #1787, the 2026-04-27 record);
    'attn_out' 2 sigmoid(W x[:gate_window]) (PR #1667). x is the block's normed input."""
    gate_window: int = 12
    """Leading residual dims read by SmearGate and the 'sparse'/'attn_out' attention gates."""
    doc_mask: bool = False
    """Document-masked attention (the 2026-04-27 record): no token attends across a bos_id token,
    so every document is scored as if it were alone, in training, every eval mode and TTT. On CUDA
    with FlashAttention the variable-length kernel runs it (eager only); otherwise SDPA with a
    block-diagonal causal mask, which gives the same result."""
    ve_layers: tuple = ()
    """Value embeddings: physical layers whose attention values get a shared token embedding added
    (the March records used 9,10); empty disables."""
    ve_dim: int = 128
    """Value embeddings: width of the shared table, projected to the key/value width."""
    record_precision: bool = False
    """Compute as the 2026-04-09 record does, to compare numbers with it bit for bit: its model is
    cast with .bfloat16() and only its linear layers and control tensors restored to fp32, so the
    token embedding table (hence the residual stream) and the rotary tables are bf16, the skip
    gates' sigmoid and the softcap run in bf16, and every matmul is bf16 (autocast, on CPU too).
    Off: fp32 table, residual stream and softcap, bf16 autocast on CUDA only."""

    def __post_init__(self):
        require(self.model_dim % self.num_heads == 0,
                f"model.model_dim ({self.model_dim}) must be a multiple of model.num_heads ({self.num_heads})")
        require(self.num_heads % self.num_kv_heads == 0,
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})")
        require(self.rope_dims % 2 == 0, f"model.rope_dims must be even, got {self.rope_dims}")
        require(self.rope_dims <= self.head_dim,
                f"model.rope_dims ({self.rope_dims}) must be at most the head dim ({self.head_dim})")
        if self.num_loops and not 0 <= self.loop_start <= self.loop_end < self.num_layers:
            raise PgError("model: the recurrence segment must lie within the layers")
        if self.vocab_size > 65536:
            raise PgError("model: vocab_size must fit the uint16 shard format (<= 65536)")
        require(self.mlp_activation in MLP_ACTIVATIONS,
                f"model.mlp_activation must be one of {', '.join(MLP_ACTIVATIONS)}, got {self.mlp_activation!r}")
        require(self.attn_gate in ATTN_GATES,
                f"model.attn_gate must be one of {', '.join(ATTN_GATES)}, got {self.attn_gate!r}")
        require(self.bigram_buckets == 0 or self.bigram_buckets >= 2,
                f"model.bigram_buckets must be 0 (off) or at least 2, got {self.bigram_buckets}")
        require(0 < self.gate_window <= self.model_dim,
                f"model.gate_window must be in 1..model_dim ({self.model_dim}), got {self.gate_window}")
        require(self.parallel_lanes in (1, 2), f"model.parallel_lanes must be 1 or 2, got {self.parallel_lanes}")
        if self.parallel_lanes == 2 and self.parallel_residual_start >= 0:
            for looping in (False, True):
                order = self.layer_order(looping)
                lanes = [layer >= self.parallel_residual_start for layer in order[len(order) // 2:]]
                require(lanes == sorted(lanes), "model: with parallel_lanes=2, every decoder layer after the first "
                        "two-lane one must be two-lane too (layers >= parallel_residual_start end the decoder)")
        require(self.rope_yarn_len >= 0 and (self.rope_yarn_len == 0 or self.rope_dims > 2),
                "model.rope_yarn_len must be 0 (off) or positive, with rope_dims > 2")
        # `--set model.ve_layers=9,10` hands over strings and a JSON manifest a list: store ints.
        layers = [str(s).strip() for s in self.ve_layers if str(s).strip()]
        require(all(s.isdigit() and int(s) < self.num_layers for s in layers),
                f"model.ve_layers must be layers in 0..{self.num_layers - 1}, got {self.ve_layers}")
        require(len(set(layers)) == len(layers), f"model.ve_layers must not repeat a layer, got {self.ve_layers}")
        object.__setattr__(self, "ve_layers", tuple(map(int, layers)))

    @property
    def head_dim(self):
        return self.model_dim // self.num_heads

    @property
    def mlp_dim(self):
        return int(self.mlp_mult * self.model_dim)

    def layer_order(self, looping):
        """Physical layer index of each virtual layer, in execution order."""
        order = list(range(self.num_layers))
        if looping and self.num_loops:
            segment = order[self.loop_start:self.loop_end + 1]
            order = order[:self.loop_end + 1] + segment * self.num_loops + order[self.loop_end + 1:]
        return order


@dataclass(frozen=True)
class EvalConfig(ConfigBase):
    seq_len: int = 2048
    """Tokens per evaluated sequence (the training context)."""
    stride: int = 64
    """Sliding window: tokens scored per window after the first; context is seq_len - stride."""
    batch_seqs: int = 32
    """Sequences (or windows) per forward pass."""
    ttt_chunk_tokens: int = 32768
    """Score-first TTT: tokens per chunk; a chunk is scored fully before the model trains on it."""
    ttt_epochs: int = 3
    """Score-first TTT: passes over each scored chunk."""
    ttt_lr: float = 0.005
    """Score-first TTT: peak SGD learning rate, cosine-decayed across chunks."""
    ttt_momentum: float = 0.9
    """Score-first TTT: SGD momentum."""
    ttt_grad_clip: float = 1.0
    """Score-first TTT: global gradient-norm clip."""
    ttt_batch_seqs: int = 32
    """Score-first TTT: sequences per training step."""
    compile: bool = False
    """torch.compile the model as the record does: fullgraph, static shapes for the standard,
    sliding and score-first TTT modes (a short last batch is padded, so scoring is one graph),
    dynamic ones for the LoRA mode, whose windows grow chunk by chunk (one adapter set, reset in
    place, serves every batch). It compiles lazily on the first real forward, so no warm-up ever
    runs on any tokens."""
    lora_chunk_tokens: int = 48
    """LoRA TTT: each document is scored in chunks of this many tokens, each chunk (all but the
    last) followed by one adapter step on it (RTOP 48; PR #1530 32)."""
    lora_rank: int = 80
    """LoRA TTT: rank of the per-document adapters on q, k, v, o, MLP and head (RTOP 80)."""
    lora_alpha: float = 144.0
    """LoRA TTT: adapter outputs are scaled by lora_alpha / lora_rank (PR #1767: 144)."""
    lora_lr: float = 1e-4
    """LoRA TTT: AdamW learning rate of the adapters."""
    lora_betas: tuple = (0.0, 0.99)
    """LoRA TTT: AdamW betas (RTOP: no first moment)."""
    lora_eps: float = 1e-10
    """LoRA TTT: AdamW epsilon."""
    lora_weight_decay: float = 0.5
    """LoRA TTT: AdamW decoupled weight decay (RTOP 0.5)."""
    lora_batch_docs: int = 64
    """LoRA TTT: documents adapted side by side, each with its own adapters, in one batch."""
    lora_group_rows: int = 64
    """LoRA TTT: rows in every forward (at most lora_batch_docs); the running documents are
    packed into forwards of exactly this many rows, padding the last. A fixed shape keeps the
    rounding of earlier documents' scores independent of how long later documents run."""
    lora_phase_docs: int = 2500
    """Phased TTT: the base weights are trained on the first this-many scored documents, in
    lora_phases cumulative phases (RTOP 2500); 0 keeps the base weights fixed."""
    lora_phases: int = 3
    """Phased TTT: number of global SGD phases over the scored-document prefix (RTOP 3)."""
    lora_phase_lr: float = 1e-3
    """Phased TTT: peak SGD learning rate of a phase, cosine-decayed over its ttt_chunk_tokens
    chunks (momentum ttt_momentum, clip ttt_grad_clip)."""
    lora_order: str = "stream"
    """Phased TTT: which documents a phase trains on. "stream": the stream's first ones, so no
    score depends on later text (`pgbuild verify` passes). "record": the 2026-04-27 record's
    schedule, to reproduce its number: batches by length, longest first, each phase on the first
    documents of that order, as its global SGD (packed rows, the last chunk skipped), and full
    batches keep their adapters' A from one batch to the next until a phase (its warm start). A
    phase then trains on text that comes after documents it goes on to score, and a warm A on
    documents scored before: neither causal (C1) nor document-independent."""

    def __post_init__(self):
        # A JSON manifest hands back lists and `--set` strings; store the betas as two floats.
        betas = tuple(float(b) for b in self.lora_betas)
        if len(betas) != 2:
            raise PgError(f"eval: lora_betas needs two values, got {self.lora_betas}")
        object.__setattr__(self, "lora_betas", betas)
        if self.lora_order not in LORA_ORDERS:
            raise PgError(f"eval: lora_order must be one of {', '.join(LORA_ORDERS)}, got {self.lora_order!r}")
        if min(self.seq_len, self.stride, self.batch_seqs, self.lora_chunk_tokens, self.lora_rank,
               self.lora_batch_docs, self.lora_group_rows) < 1 or self.lora_chunk_tokens > self.seq_len:
            raise PgError("eval: sizes must be positive and lora_chunk_tokens at most seq_len")
