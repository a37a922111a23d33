"""The GPT of the 2026-04-09 record, driven by `ModelConfig`.

Token embedding -> RMSNorm -> a U-Net of blocks (the first half pushes skips, the second half pops
them) with depth recurrence over a middle segment -> RMSNorm -> tied head -> tanh softcap.
Every block mixes its input with the embedding output x0 (resid_mix) and scales its normed input
by 1/sqrt(layer+1). Attention is grouped-query with RMS-normed q/k, a learned per-head q gain,
partial RoPE and, on the last layers, exclusive self-attention (XSA).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

try:  # FlashAttention 3 on Hopper, else FlashAttention 2, else torch's SDPA.
    from flash_attn_interface import flash_attn_func
except ImportError:
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


class RMSNorm(nn.Module):
    def forward(self, x):
        return rms_norm(x)


def causal_attention(q, k, v):
    """q: (B, T, H, D), k/v: (B, T, Hkv, D) -> (B, T, H, D), causal, full softmax."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=True)
    return y.transpose(1, 2)


class Rotary(nn.Module):
    """Half-split rotary encoding of the first `dims` channels of each head."""

    def __init__(self, dims, base):
        super().__init__()
        self.dims = dims
        self.register_buffer("inv_freq", base ** (-torch.arange(0, dims, 2).float() / dims), persistent=False)

    def forward(self, x):
        if self.dims == 0:
            return x
        t = torch.arange(x.size(1), device=x.device, dtype=torch.float32)
        angles = torch.outer(t, self.inv_freq)[None, :, None, :]
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
        self.rotary = Rotary(cfg.rope_dims, cfg.rope_base)
        self.xsa = xsa

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v(x).view(B, T, self.num_kv_heads, self.head_dim)
        q = self.rotary(rms_norm(q)) * self.q_gain.to(q.dtype)[:, None]
        k = self.rotary(rms_norm(k))
        y = causal_attention(q, k, v)
        if self.xsa:
            # Drop the part of each head's output that merely copies its own token's value.
            y = y.view(B, T, self.num_kv_heads, -1, self.head_dim)
            v_hat = F.normalize(v, dim=-1).unsqueeze(3)
            y = y - (y * v_hat).sum(-1, keepdim=True) * v_hat
        return self.out(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.model_dim, cfg.mlp_dim, bias=False)
        self.proj = nn.Linear(cfg.mlp_dim, cfg.model_dim, bias=False)
        self.slope = cfg.leaky_relu_slope

    def forward(self, x):
        return self.proj(F.leaky_relu(self.fc(x), self.slope).square())


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.attn = Attention(cfg, xsa=layer >= cfg.num_layers - cfg.xsa_last_n)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim))))
        self.norm_scale = 1 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        self.parallel = 0 <= cfg.parallel_residual_start <= layer

    def forward(self, x, x0):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        h = rms_norm(x) * self.norm_scale
        if self.parallel:
            return x + self.attn_scale.to(x.dtype) * self.attn(h) + self.mlp_scale.to(x.dtype) * self.mlp(h)
        x = x + self.attn_scale.to(x.dtype) * self.attn(h)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.norm_scale)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        num_skips = max(len(cfg.layer_order(looping)) // 2 for looping in (False, True))
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, cfg.model_dim)) if cfg.skip_gates else None
        self.final_norm = RMSNorm()  # a module so calibration can hook the head's input
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.model_dim, cfg.vocab_size, bias=False)
        self.looping = True  # training turns recurrence on part-way; evaluation always loops

    def reset_parameters(self):
        """The record's init: orthogonal matrices, zeroed output projections, small embeddings."""
        nn.init.normal_(self.tok_emb.weight, std=self.cfg.embed_init_std)
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.proj.weight")):
                nn.init.zeros_(p)
            elif p.ndim == 2 and min(p.shape) >= 64 and name != "tok_emb.weight":
                nn.init.orthogonal_(p)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.weight)

    def forward(self, ids, targets=None):
        """Softcapped logits (B, T, vocab) for token ids (B, T); with `targets`, the per-token
        negative log-likelihood in nats (B, T) from a full softmax over the vocabulary."""
        x = x0 = rms_norm(self.tok_emb(ids))
        order = self.cfg.layer_order(self.looping)
        num_encoder = len(order) // 2
        skips = []
        for layer in order[:num_encoder]:
            x = self.blocks[layer](x, x0)
            skips.append(x)
        for j, layer in enumerate(order[num_encoder:]):
            if skips:
                skip = self.skip_weights[j].to(x.dtype) * skips.pop()
                if self.skip_gates is None:
                    x = x + skip
                else:
                    x = torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))
            x = self.blocks[layer](x, x0)
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(self.final_norm(x), head.to(x.dtype)).float()
        cap = self.cfg.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
