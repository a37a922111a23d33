"""The model's shape and the evaluation's settings, as frozen dataclasses.

Each field's docstring is its help text: the builder reads these docstrings to document
`--set model.FIELD=VALUE` and `pgbuild presets`. Both configs are stored in the artifact's manifest
and rebuilt from it with `from_dict`, which rejects unknown keys rather than guessing.
"""

from dataclasses import asdict, dataclass, fields

from .errors import PgError


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
    """From this physical layer on, attention and MLP read the same input (GPT-J style); -1 disables."""
    xsa_last_n: int = 11
    """Exclusive self-attention on the last N physical layers: remove each output's component
    along its own token's value."""

    def __post_init__(self):
        if self.model_dim % self.num_heads or self.num_heads % self.num_kv_heads:
            raise PgError("model: model_dim must divide by num_heads, and num_heads by num_kv_heads")
        if self.rope_dims % 2 or self.rope_dims > self.head_dim:
            raise PgError("model: rope_dims must be even and at most the head dim")
        if self.num_loops and not 0 <= self.loop_start <= self.loop_end < self.num_layers:
            raise PgError("model: the recurrence segment must lie within the layers")
        if self.vocab_size > 65536:
            raise PgError("model: vocab_size must fit the uint16 shard format (<= 65536)")

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
