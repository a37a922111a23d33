"""The GPT of the 2026-04-09 record, driven by `ModelConfig`, with the other seeds' switches.

Token embedding -> RMSNorm -> a U-Net of blocks (the first half pushes skips, the second half pops
them) with depth recurrence over a middle segment -> RMSNorm -> tied head -> tanh softcap.
Every block mixes its input with the embedding output x0 (resid_mix) and scales its normed input
by 1/sqrt(layer+1). Attention is grouped-query with RMS-normed q/k, a learned per-head q gain,
partial RoPE and, on the last layers, exclusive self-attention (XSA).

Switches, all off in the record: BigramHash and SmearGate on the token embedding, value
embeddings added to chosen layers' attention values, a per-head gate on the attention output,
the MLP's activation, and from the 2026-04-27 record document-masked attention, a two-lane
parallel decoder and NTK-scaled ("YaRN") RoPE beyond the trained length. Every one of them reads
only the current and earlier tokens.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from runtime.attention import Documents, causal_attention


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


class RMSNorm(nn.Module):
    def forward(self, x):
        return rms_norm(x)


def bigram_hash(ids, buckets):
    """The records' bucket of (token t, token t-1): (36313*t XOR 27191*prev) mod (buckets-1), in
    int32 as they compute it; position 0 has no predecessor and gets the last bucket. A BOS token's
    bucket still hashes the previous document's last token, as in the records: that is earlier
    text, which this runtime's attention reads anyway."""
    t = ids.int()
    pairs = torch.bitwise_xor(36313 * t[:, 1:], 27191 * t[:, :-1]) % (buckets - 1)
    return torch.cat((torch.full_like(t[:, :1], buckets - 1), pairs), 1).long()


class ProjectedEmbedding(nn.Module):
    """A narrow lookup table, projected up and scaled by a learned scalar (BigramHash, VE)."""

    def __init__(self, rows, dim, out_dim, scale):
        super().__init__()
        self.table = nn.Embedding(rows, dim)
        self.proj = nn.Linear(dim, out_dim, bias=False)
        self.scale = nn.Parameter(torch.full((1,), scale))

    def forward(self, ids):
        h = self.proj(self.table(ids))
        return h * self.scale.to(h.dtype)


class SmearGate(nn.Module):
    """x_t += lam * sigmoid(W x_t[:window]) * x_(t-1), except at BOS tokens (PR #1667 form with the
    #1855 fix): unmasked, a document's first token would read the previous document's last one."""

    def __init__(self, cfg):
        super().__init__()
        self.bos_id = cfg.bos_id
        self.gate_w = nn.Parameter(torch.zeros(1, cfg.gate_window))
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, x, ids):
        cur = x[:, 1:]
        gate = self.lam.to(x.dtype) * torch.sigmoid(F.linear(cur[..., :self.gate_w.size(1)], self.gate_w.to(x.dtype)))
        gate = gate * (ids[:, 1:, None] != self.bos_id).to(x.dtype)
        return torch.cat((x[:, :1], cur + gate * x[:, :-1]), 1)


def rope_frequencies(dims, base, device=None):
    # 1 / base^(2i/dims) rather than base^(-2i/dims): the same frequencies to the last bit as the records.
    return 1.0 / base ** (torch.arange(0, dims, 2, dtype=torch.float32, device=device) / dims)


class Rotary(nn.Module):
    """Half-split rotary encoding of the first `dims` channels of each head. Beyond `yarn_len`
    positions (0: never) the base is NTK-scaled to base * (T / yarn_len)^(dims / (dims - 2)), so
    the slowest frequency still turns less than it did over the trained length."""

    def __init__(self, dims, base, yarn_len=0):
        super().__init__()
        self.dims, self.base, self.yarn_len = dims, base, yarn_len
        self.register_buffer("inv_freq", rope_frequencies(dims, base), persistent=False)

    def forward(self, x):
        if self.dims == 0:
            return x
        T = x.size(1)
        if self.yarn_len and T > self.yarn_len:
            inv_freq = rope_frequencies(self.dims, self.base * (T / self.yarn_len) ** (self.dims / (self.dims - 2)),
                                        x.device)
        else:
            inv_freq = self.inv_freq
        t = torch.arange(T, device=x.device, dtype=inv_freq.dtype)  # bf16 positions under record_precision, as r0409's
        angles = torch.outer(t, inv_freq)[None, :, None, :]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        half = self.dims // 2
        x1, x2, rest = x[..., :half], x[..., half:self.dims], x[..., self.dims:]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg, xsa):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.q = nn.Linear(cfg.model_dim, cfg.model_dim, bias=False)
        self.k = nn.Linear(cfg.model_dim, kv_dim, bias=False)
        self.v = nn.Linear(cfg.model_dim, kv_dim, bias=False)
        self.out = nn.Linear(cfg.model_dim, cfg.model_dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        self.rotary = Rotary(cfg.rope_dims, cfg.rope_base, cfg.rope_yarn_len)
        self.xsa = xsa
        self.gate = cfg.attn_gate
        if self.gate != "none":
            width = cfg.model_dim if self.gate == "dense" else cfg.gate_window
            self.gate_w = nn.Parameter(torch.zeros(cfg.num_heads, width))

    def head_gates(self, x):
        """(B, T, H) multipliers: dense sigmoid(Wx), sparse sigmoid(Wx/2), attn_out 2 sigmoid(Wx);
        the last two read only x's first gate_window dims."""
        z = F.linear(x[..., :self.gate_w.size(1)], self.gate_w.to(x.dtype))
        return 2 * torch.sigmoid(z) if self.gate == "attn_out" else torch.sigmoid(z / 2 if self.gate == "sparse" else z)

    def forward(self, x, ve=None, lora=None, docs=None):
        B, T, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        if lora is not None:
            q, k, v = q + lora["q"](x), k + lora["k"](x), v + lora["v"](x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = (v if ve is None else v + ve.to(v.dtype)).view(B, T, self.num_kv_heads, self.head_dim)
        q = self.rotary(rms_norm(q)) * self.q_gain.to(q.dtype)[:, None]
        k = self.rotary(rms_norm(k))
        y = causal_attention(q, k, v, docs)
        if self.xsa:
            # Drop the part of each head's output that merely copies its own token's value.
            y = y.view(B, T, self.num_kv_heads, -1, self.head_dim)
            v_hat = F.normalize(v, dim=-1).unsqueeze(3)
            y = y - (y * v_hat).sum(-1, keepdim=True) * v_hat
        y = y.reshape(B, T, self.num_heads, self.head_dim)
        if self.gate != "none":
            y = y * self.head_gates(x)[..., None]
        return self.out(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.model_dim, cfg.mlp_dim, bias=False)
        self.proj = nn.Linear(cfg.mlp_dim, cfg.model_dim, bias=False)
        self.act = cfg.mlp_activation
        self.slope = cfg.leaky_relu_slope if self.act == "leaky_relu2" else 0.0  # relu2 is slope 0
        # Training's MLP through a fused kernel (GPT.use_fused_kernels; builder/train/fused_mlp.py
        # on a GPU): fn(x, fc weight, proj weight, slope) -> this forward's output, its math.
        self.fused = None

    def forward(self, x):
        if self.fused is not None and self.training:
            return self.fused(x, self.fc.weight, self.proj.weight, self.slope)
        h = self.fc(x)
        return self.proj(F.gelu(h) if self.act == "gelu" else F.leaky_relu(h, self.slope).square())


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.attn = Attention(cfg, xsa=layer >= cfg.num_layers - cfg.xsa_last_n)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim))))
        self.ve_scale = nn.Parameter(torch.ones(1)) if layer in cfg.ve_layers else None
        self.norm_scale = 1 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        parallel = 0 <= cfg.parallel_residual_start <= layer
        self.parallel = parallel and cfg.parallel_lanes == 1
        if parallel and cfg.parallel_lanes == 2:
            # lane_resid[i] scales lane i's carry; lane_post[s, i] is how much of sublayer s
            # (0 attention, 1 MLP) lane i receives. The record's init: 1.1 and 1.
            self.lane_resid = nn.Parameter(torch.full((2,), 1.1))
            self.lane_post = nn.Parameter(torch.ones(2, 2))
        else:
            self.lane_resid = self.lane_post = None

    def forward(self, x, x0, ve=None, lora=None, docs=None):
        """`lora`: optional test-time adapters for this virtual layer, modules "q", "k", "v", "o"
        reading the normed block input and "mlp" reading the MLP's input; each adds a delta to
        the projection (or sublayer output) of the same name."""
        x = self._mix(x, x0)
        h = rms_norm(x) * self.norm_scale
        a = self._attention(h, ve, lora, docs)
        if self.parallel:
            # The MLP's input is normed anew rather than reusing h: the same values, but gradients
            # then sum as the records' do, which keeps training bit-comparable with their code.
            h_mlp = rms_norm(x) * self.norm_scale
            return x + self.attn_scale.to(x.dtype) * a + self.mlp_scale.to(x.dtype) * self._mlp(h_mlp, lora)
        x = x + self.attn_scale.to(x.dtype) * a
        return x + self.mlp_scale.to(x.dtype) * self._mlp(rms_norm(x) * self.norm_scale, lora)

    def forward_lanes(self, lanes, x0, ve=None, lora=None, docs=None):
        """The two-lane parallel block (2026-04-27 record): attention reads the resid-mixed
        attention lane, the MLP reads the MLP lane, and each lane takes both outputs."""
        attn_lane, mlp_lane = lanes
        h = rms_norm(self._mix(attn_lane, x0)) * self.norm_scale
        a = self.attn_scale.to(h.dtype) * self._attention(h, ve, lora, docs)
        m = self.mlp_scale.to(h.dtype) * self._mlp(rms_norm(mlp_lane) * self.norm_scale, lora)
        resid, post = self.lane_resid.to(h.dtype), self.lane_post.to(h.dtype)
        return (resid[0] * attn_lane + post[0, 0] * a + post[1, 0] * m,
                resid[1] * mlp_lane + post[0, 1] * a + post[1, 1] * m)

    def _mix(self, x, x0):
        mix = self.resid_mix.to(x.dtype)
        return mix[0] * x + mix[1] * x0

    def _attention(self, h, ve, lora, docs):
        a = self.attn(h, None if self.ve_scale is None else ve * self.ve_scale.to(ve.dtype), lora, docs)
        return a if lora is None else a + lora["o"](h)

    def _mlp(self, x, lora):
        return self.mlp(x) if lora is None else self.mlp(x) + lora["mlp"](x)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.bigram_emb = (ProjectedEmbedding(cfg.bigram_buckets, cfg.bigram_dim, cfg.model_dim, 0.05)
                           if cfg.bigram_buckets else None)
        self.smear = SmearGate(cfg) if cfg.smear_gate else None
        self.value_emb = (ProjectedEmbedding(cfg.vocab_size, cfg.ve_dim, cfg.num_kv_heads * cfg.head_dim, 0.1)
                          if cfg.ve_layers else None)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        num_skips = max(len(cfg.layer_order(looping)) // 2 for looping in (False, True))
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, cfg.model_dim)) if cfg.skip_gates else None
        self.final_norm = RMSNorm()  # a module so calibration can hook the head's input
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.model_dim, cfg.vocab_size, bias=False)
        self.looping = True  # training turns recurrence on part-way; evaluation always loops
        # The training loss through a fused kernel (use_fused_kernels; builder/train/fused_loss.py
        # on a GPU): fn(pre-cap logits (N, V), targets (N,), cap) -> mean loss, the eager loss's math.
        self.fused_loss = None
        self.apply_precision()

    def use_fused_kernels(self, loss=None, mlp=None):
        """Route the mean training loss through `loss` and every MLP's training forward through
        `mlp` (see their attributes above); None restores the model's own code."""
        self.fused_loss = loss
        for block in self.blocks:
            block.mlp.fused = mlp
        return self

    def apply_precision(self):
        """With cfg.record_precision, the record's bf16 token embedding and rotary tables (call it
        again after casting the whole model)."""
        if self.cfg.record_precision:
            self.tok_emb.to(torch.bfloat16)
            for module in self.modules():
                if isinstance(module, Rotary):
                    module.inv_freq = module.inv_freq.bfloat16()
        return self

    def reset_parameters(self):
        """The records' init: orthogonal matrices (and embedding projections), zeroed output
        projections and BigramHash table, N(0, 0.01) value-embedding table and dense gates, small
        token embeddings. Scales, mixes and the other gates keep their constructor values."""
        dense_gates = self.cfg.attn_gate == "dense"
        for name, p in self.named_parameters():
            big_matrix = p.ndim == 2 and min(p.shape) >= 64 and not name.endswith(("table.weight", "gate_w"))
            if name == "tok_emb.weight":
                nn.init.normal_(p, std=self.cfg.embed_init_std)
            elif name.endswith(("attn.out.weight", "mlp.proj.weight", "lm_head.weight", "bigram_emb.table.weight")):
                nn.init.zeros_(p)
            elif name == "value_emb.table.weight" or dense_gates and name.endswith("attn.gate_w"):
                nn.init.normal_(p, std=0.01)
            elif big_matrix or name.endswith("emb.proj.weight"):
                # The records zero projections narrower than 64, which with a zero table would
                # never get a gradient; an orthogonal projection of any width lets the table learn.
                nn.init.orthogonal_(p)

    def forward(self, ids, targets=None, adapters=None, mean=False, max_doc_len=0):
        """Softcapped logits (B, T, vocab) for token ids (B, T); with `targets`, the per-token
        negative log-likelihood in nats (B, T) from a full softmax over the vocabulary, or with
        `mean` its mean as cross_entropy reduces it (training: the records' exact loss and gradient).

        `adapters` (LoRA test-time training, runtime/lora_ttt.py) adds low-rank deltas through
        this same forward: `adapters.layers[i]` is given to the i-th virtual layer's block and
        `adapters.head` adds to the logits before the softcap. One forward for every use means
        no hand-copied TTT forward can drift from the model (a record lost 0.8 bpb that way).
        Each row then holds one document's window (right-padded): attention is plainly causal,
        doc_mask or not, as in the record's TTT forward, and takes the causal kernels.
        `max_doc_len` > 0 masks attention at documents, doc_mask or not, cut every max_doc_len
        tokens (Documents): rows that pack many windows, as the records'."""
        if self.cfg.record_precision and not torch.is_autocast_enabled(ids.device.type):
            with torch.autocast(ids.device.type, torch.bfloat16):  # the record's linears cast to bf16
                return self.forward(ids, targets, adapters, mean, max_doc_len)
        x = self.tok_emb(ids)
        if self.bigram_emb is not None:
            x = x + self.bigram_emb(bigram_hash(ids, self.cfg.bigram_buckets))
        if self.smear is not None:
            x = self.smear(x, ids)
        x = x0 = rms_norm(x)
        ve = None if self.value_emb is None else self.value_emb(ids)
        masked = (self.cfg.doc_mask and adapters is None) or max_doc_len
        docs = Documents.of_tokens(ids, self.cfg.bos_id, max_doc_len) if masked else None
        order = self.cfg.layer_order(self.looping)
        num_encoder = len(order) // 2
        skips = []
        lora = [None] * len(order) if adapters is None else adapters.layers
        for i, layer in enumerate(order[:num_encoder]):
            x = self.blocks[layer](x, x0, ve, lora[i], docs)
            skips.append(x)
        mlp_lane = None  # the two-lane decoder's second lane; x is the first (the skips feed it)
        for j, layer in enumerate(order[num_encoder:]):
            block = self.blocks[layer]
            if block.lane_post is not None and mlp_lane is None:
                mlp_lane = x  # both lanes start from the stream as it enters, before this layer's skip
            if skips:
                skip = self.skip_weights[j].to(x.dtype) * skips.pop()
                if self.skip_gates is None:
                    x = x + skip
                else:
                    x = torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j].to(x.dtype)))
            if block.lane_post is None:
                x = block(x, x0, ve, lora[num_encoder + j], docs)
            else:
                x, mlp_lane = block.forward_lanes((x, mlp_lane), x0, ve, lora[num_encoder + j], docs)
        if mlp_lane is not None:
            x = 0.5 * (x + mlp_lane)
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        x = self.final_norm(x)
        logits = F.linear(x, head.to(x.dtype))
        if adapters is not None:
            logits = logits + adapters.head(x)
        if mean and self.fused_loss is not None:
            return self.fused_loss(logits.flatten(0, 1), targets.flatten(), self.cfg.logit_softcap)
        if not self.cfg.record_precision:  # the record caps its bf16 logits
            logits = logits.float()
        cap = self.cfg.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        logits = logits.float()
        if targets is None:
            return logits
        if mean:
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
