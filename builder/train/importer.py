"""Weights trained by a record's own script, turned into a pgbuild GPT state dict.

Both records save `torch.save(model.state_dict())` as `final_model.pt`:
- r0409, the 2026-04-09 record: one tensor per matrix, named `blocks.N.attn.c_q.weight` etc.
- r0427, the 2026-04-27 record: its block matrices in four banks (`qo_bank` holds every layer's q
  then every layer's out projection, `kv_bank` k then v, `mlp_up_bank` and `mlp_down_bank` one per
  layer), the two-lane decoder's weights as `parallel_{post,resid}_lambdas` (one row per layer,
  used by the two-lane layers only), the sparse gate as `attn.attn_gate_w` and SmearGate as
  `smear_gate.weight` and `smear_lambda`.

The models then compute the same function up to names and one sign: the records' RoPE rotates
the other way, (x1 cos + x2 sin, -x1 sin + x2 cos) where pgbuild's is (x1 cos - x2 sin,
x1 sin + x2 cos). Negating x2 on the way in makes pgbuild's output equal the record's with its
second rotary half negated; q and k are both flipped in the same dims, so every q.k is unchanged,
and the per-head RMS norm before RoPE ignores signs. So negating the q and k rows that produce
dims [rope_dims/2, rope_dims) of each head gives identical attention scores.
"""

import pickle

import torch

from builder.provenance import environment
from runtime.errors import PgError
from runtime.files import file_sha256
from runtime.model import GPT

FORMATS = {"r0409": "the 2026-04-09 record's final_model.pt",
           "r0427": "the 2026-04-27 record's final_model.pt"}

# Record name (after `blocks.N.`) -> pgbuild name; everything else keeps its name.
R0409_BLOCK_NAMES = {
    "attn.c_q.weight": "attn.q.weight",
    "attn.c_k.weight": "attn.k.weight",
    "attn.c_v.weight": "attn.v.weight",
    "attn.proj.weight": "attn.out.weight",
}

# r0427's banks: name -> the pgbuild matrix of each of its n-layer halves, in order.
R0427_BANKS = {
    "qo_bank": ("attn.q.weight", "attn.out.weight"),
    "kv_bank": ("attn.k.weight", "attn.v.weight"),
    "mlp_up_bank": ("mlp.fc.weight",),
    "mlp_down_bank": ("mlp.proj.weight",),
}
R0427_NAMES = {"smear_gate.weight": "smear.gate_w", "smear_lambda": "smear.lam"}
R0427_LANES = {"parallel_post_lambdas": "lane_post", "parallel_resid_lambdas": "lane_resid"}


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


def _check_state_dict(state_dict, fmt):
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                                   for k, v in state_dict.items()):
        raise PgError(f"{fmt} checkpoint: expected a state dict (a dict of name -> tensor), "
                      f"got {type(state_dict).__name__}")
    return state_dict


def _to_pgbuild(renamed, model_cfg, fmt, record_name=lambda name: name):
    """Check `renamed` ({pgbuild name: (record name, tensor)}) against model_cfg's exact tensor set
    and shapes, and flip the rotary rows."""
    if model_cfg.mlp_activation != "leaky_relu2" or model_cfg.leaky_relu_slope != 0.5:
        raise PgError(f"{fmt} checkpoint: the record's MLP is LeakyReLU(0.5) squared; set "
                      "model.mlp_activation=leaky_relu2 and model.leaky_relu_slope=0.5")
    expected = _expected_shapes(model_cfg)
    state = {}
    for target, (name, tensor) in renamed.items():
        if target not in expected:
            raise PgError(f"{fmt} checkpoint: unexpected tensor {name} {tuple(tensor.shape)} "
                          "(not part of a record model of this configuration)")
        if tuple(tensor.shape) != expected[target]:
            raise PgError(f"{fmt} checkpoint: tensor {name} has shape {tuple(tensor.shape)}, "
                          f"the configuration expects {expected[target]}")
        state[target] = tensor.float()  # the records keep their embedding in bf16: widen losslessly
    missing = [name for name in expected if name not in state]
    if missing:
        raise PgError(f"{fmt} checkpoint: missing tensor {record_name(missing[0])}"
                      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name in state:
        if name.endswith("attn.q.weight"):
            state[name] = _flip_rope_rows(state[name], model_cfg.num_heads, model_cfg)
        elif name.endswith("attn.k.weight"):
            state[name] = _flip_rope_rows(state[name], model_cfg.num_kv_heads, model_cfg)
    return state


def from_r0409(state_dict, model_cfg):
    """The 2026-04-09 record's `state_dict` as a state dict for `runtime.model.GPT(model_cfg)`.

    Raises PgError naming the tensor on anything that is not exactly the record's tensor set at
    model_cfg's shapes. The input is not modified."""
    state_dict = _check_state_dict(state_dict, "r0409")
    renamed = {_pgbuild_name(name): (name, t) for name, t in state_dict.items()}
    return _to_pgbuild(renamed, model_cfg, "r0409", _record_name)


def from_r0427(state_dict, model_cfg):
    """The 2026-04-27 record's `state_dict` as a state dict for `runtime.model.GPT(model_cfg)`:
    banks split per layer, the lane weights of the two-lane layers kept (the record's rows for
    its sequential layers are never read), the rest renamed. Raises PgError like from_r0409."""
    state_dict = _check_state_dict(state_dict, "r0427")
    n = model_cfg.num_layers
    lanes = model_cfg.parallel_residual_start >= 0
    if lanes and model_cfg.parallel_lanes != 2:
        raise PgError("r0427 checkpoint: the record's parallel decoder is two-lane; set model.parallel_lanes=2 "
                      "(or model.parallel_residual_start=-1 for a run with PARALLEL_START_LAYER=0)")
    renamed = {}
    for name, tensor in state_dict.items():
        if name in R0427_BANKS:
            parts = R0427_BANKS[name]
            if tensor.ndim != 3 or tensor.size(0) != n * len(parts):
                raise PgError(f"r0427 checkpoint: bank {name} has shape {tuple(tensor.shape)}, "
                              f"the configuration expects {n * len(parts)} matrices")
            for half, part in enumerate(parts):
                for layer in range(n):
                    renamed[f"blocks.{layer}.{part}"] = (f"{name}[{half * n + layer}]", tensor[half * n + layer])
        elif name in R0427_LANES:
            if tensor.size(0) != n:
                raise PgError(f"r0427 checkpoint: {name} has shape {tuple(tensor.shape)}, expected one row per layer")
            for layer in range(max(model_cfg.parallel_residual_start, 0) if lanes else n, n):
                renamed[f"blocks.{layer}.{R0427_LANES[name]}"] = (f"{name}[{layer}]", tensor[layer])
        elif name.startswith("blocks.") and name.endswith(".attn.attn_gate_w"):
            renamed[name.replace(".attn.attn_gate_w", ".attn.gate_w")] = (name, tensor)
        else:
            renamed[R0427_NAMES.get(name, name)] = (name, tensor)
    return _to_pgbuild(renamed, model_cfg, "r0427")


def import_record(path, fmt, model_cfg):
    """(pgbuild state dict, provenance) of the record checkpoint (format `fmt`) at `path`."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise PgError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    prov = {**environment(), "imported_from": fmt, "source_sha256": file_sha256(path)}
    convert = {"r0409": from_r0409, "r0427": from_r0427}[fmt]
    return convert(state_dict, model_cfg), prov
