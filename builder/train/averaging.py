"""Weight averaging over training: EMA (every step) and SWA (uniform, late in training).

Which weights training hands on, in order of preference:

1. the SWA average, when `train.swa_every` > 0 and at least one snapshot was taken;
2. the EMA, when `train.ema_decay` > 0;
3. the last weights.

Both averages can run together: the EMA is then the fallback for a run too short to reach
`swa_start_frac`. Both average the raw weights (SWA does not average the EMA), in fp32.
"""

import torch


class EMA:
    """Exponential moving average of all weights, in fp32, without bias correction."""

    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v.float(), 1 - self.decay)

    def weights(self):
        return self.shadow

    def state_dict(self):
        return {"shadow": self.shadow}

    def load_state_dict(self, state):
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


class SWA:
    """Uniform average of snapshots taken every `every` steps once training is `start_frac` done."""

    def __init__(self, model, every, start_frac):
        self.every, self.start_frac = every, start_frac
        self.total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in model.state_dict().items()}
        self.count = 0

    @torch.no_grad()
    def maybe_collect(self, model, step, frac):
        """Add a snapshot if this step is due one; returns whether it did."""
        if frac < self.start_frac or step % self.every:
            return False
        for k, v in model.state_dict().items():
            self.total[k].add_(v.float())
        self.count += 1
        return True

    def weights(self):
        return {k: v / self.count for k, v in self.total.items()} if self.count else None

    def state_dict(self):
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state):
        for k, v in state["total"].items():
            self.total[k].copy_(v)
        self.count = int(state["count"])


class Averages:
    """The averages a run keeps (as configured) and the choice of final weights."""

    def __init__(self, model, cfg):
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.swa = SWA(model, cfg.swa_every, cfg.swa_start_frac) if cfg.swa_every > 0 else None

    def update(self, model, step, frac):
        """After optimizer step number `step`; returns True when SWA took its first snapshot."""
        if self.ema is not None:
            self.ema.update(model)
        return self.swa is not None and self.swa.maybe_collect(model, step, frac) and self.swa.count == 1

    def source(self):
        """Where the final weights come from: 'swa (N snapshots)', 'ema' or 'last'."""
        if self.swa is not None and self.swa.count:
            return f"swa ({self.swa.count} snapshots)"
        return "ema" if self.ema is not None else "last"

    def final_weights(self, model):
        """(state dict in fp32, its source)."""
        source = self.source()
        if source.startswith("swa"):
            return self.swa.weights(), source
        if source == "ema":
            return self.ema.weights(), source
        return {k: v.detach().float() for k, v in model.state_dict().items()}, source

    def load_final_into(self, model):
        weights, _ = self.final_weights(model)
        current = model.state_dict()
        model.load_state_dict({k: v.to(current[k].dtype) for k, v in weights.items()})

    def state_dict(self):
        return {"ema": None if self.ema is None else self.ema.state_dict(),
                "swa": None if self.swa is None else self.swa.state_dict()}

    def load_state_dict(self, state):
        for name in ("ema", "swa"):
            mine, saved = getattr(self, name), state.get(name)
            if mine is not None and saved is not None:
                mine.load_state_dict(saved)
