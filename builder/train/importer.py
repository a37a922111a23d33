"""Weights trained by a record's own script, turned into a pgbuild GPT state dict.

`from_r0409` reads the `final_model.pt` of the 2026-04-09 record (`torch.save` of its model's
`state_dict()`). The two models compute the same function up to names and one sign: the record's
RoPE rotates the other way, (x1 cos + x2 sin, -x1 sin + x2 cos) where pgbuild's is
(x1 cos - x2 sin, x1 sin + x2 cos). Negating x2 on the way in makes pgbuild's output equal the
record's with its second rotary half negated; q and k are both flipped in the same dims, so every
q.k is unchanged, and the per-head RMS norm before RoPE ignores signs. So negating the q and k
rows that produce dims [rope_dims/2, rope_dims) of each head gives identical attention scores.
"""

import pickle

import torch

from builder.provenance import environment
from runtime.errors import PgError
from runtime.files import file_sha256
from runtime.model import GPT

# Record name (after `blocks.N.`) -> pgbuild name; everything else keeps its name.
R0409_BLOCK_NAMES = {
    "attn.c_q.weight": "attn.q.weight",
    "attn.c_k.weight": "attn.k.weight",
    "attn.c_v.weight": "attn.v.weight",
    "attn.proj.weight": "attn.out.weight",
}


def _pgbuild_name(name):
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in R0409_BLOCK_NAMES:
        return f"blocks.{parts[1]}.{R0409_BLOCK_NAMES[parts[2]]}"
    return name


def _record_name(name):
    parts = name.split(".", 2)
    back = {v: k for k, v in R0409_BLOCK_NAMES.items()}
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in back:
        return f"blocks.{parts[1]}.{back[parts[2]]}"
    return name


def _expected_shapes(model_cfg):
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in GPT(model_cfg).state_dict().items()}


def _flip_rope_rows(weight, heads, cfg):
    """Negate the rows producing each head's second rotary half."""
    rows = weight.detach().clone().view(heads, cfg.head_dim, -1)
    rows[:, cfg.rope_dims // 2:cfg.rope_dims] *= -1
    return rows.view_as(weight)


def from_r0409(state_dict, model_cfg):
    """The record's `state_dict` as a state dict for `runtime.model.GPT(model_cfg)`.

    Raises PgError naming the tensor on anything that is not exactly the record's tensor set at
    model_cfg's shapes. The input is not modified."""
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                                   for k, v in state_dict.items()):
        raise PgError("r0409 checkpoint: expected a state dict (a dict of name -> tensor), "
                      f"got {type(state_dict).__name__}")
    if model_cfg.mlp_activation != "leaky_relu2" or model_cfg.leaky_relu_slope != 0.5:
        raise PgError("r0409 checkpoint: the record's MLP is LeakyReLU(0.5) squared; set "
                      "model.mlp_activation=leaky_relu2 and model.leaky_relu_slope=0.5")
    expected = _expected_shapes(model_cfg)
    renamed = {}
    for name, tensor in state_dict.items():
        target = _pgbuild_name(name)
        if target not in expected:
            raise PgError(f"r0409 checkpoint: unexpected tensor {name} {tuple(tensor.shape)} "
                          "(not part of a record model of this configuration)")
        if tuple(tensor.shape) != expected[target]:
            raise PgError(f"r0409 checkpoint: tensor {name} has shape {tuple(tensor.shape)}, "
                          f"the configuration expects {expected[target]}")
        renamed[target] = tensor.float()  # the record keeps its embedding in bf16: widen losslessly
    missing = [name for name in expected if name not in renamed]
    if missing:
        raise PgError(f"r0409 checkpoint: missing tensor {_record_name(missing[0])}"
                      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name in renamed:
        if name.endswith("attn.q.weight"):
            renamed[name] = _flip_rope_rows(renamed[name], model_cfg.num_heads, model_cfg)
        elif name.endswith("attn.k.weight"):
            renamed[name] = _flip_rope_rows(renamed[name], model_cfg.num_kv_heads, model_cfg)
    return renamed


def import_r0409(path, model_cfg):
    """(pgbuild state dict, provenance) of the record checkpoint at `path`."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise PgError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    prov = {**environment(), "imported_from": "r0409", "source_sha256": file_sha256(path)}
    return from_r0409(state_dict, model_cfg), prov
