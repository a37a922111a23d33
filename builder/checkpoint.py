"""Checkpoints: the weights of a finished training run (`pgbuild train`, then `pgbuild quantize`)
and the state to resume one from."""

import io
import pickle

import torch

from builder.config import Preset
from runtime.errors import PgError
from runtime.files import write_atomic
from runtime.model import GPT


def save_checkpoint(path, model, preset, prov, training=None):
    """The weights to quantize (a model or a state dict) and, to resume training from, a
    `Trainer.state_dict()`."""
    weights = model.state_dict() if isinstance(model, torch.nn.Module) else model
    ckpt = {"preset": preset.to_dict(), "state": {k: v.cpu() for k, v in weights.items()}, "provenance": prov}
    if training is not None:
        ckpt["training"] = training
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    write_atomic(path, buf.getvalue(), "checkpoint")


def load_training_state(path):
    """(preset, training state) of a checkpoint to resume."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        preset = Preset.from_dict(ckpt["preset"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise PgError(f"{path}: not a readable pgbuild checkpoint ({str(e).splitlines()[0]})") from None
    if "training" not in ckpt:
        raise PgError(f"{path}: holds no training state to resume (written by `pgbuild train` of an older version?)")
    return preset, ckpt["training"]


def load_checkpoint(path, device):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        preset = Preset.from_dict(ckpt["preset"])
        model = GPT(preset.model)
        model.load_state_dict(ckpt["state"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise PgError(f"{path}: not a readable pgbuild checkpoint ({str(e).splitlines()[0]})") from None
    return model.to(device), preset, ckpt["provenance"]
