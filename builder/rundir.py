"""Run folders: what `--run-dir DIR` on `pgbuild train` and `pgbuild train-and-pack` writes.

Every file is written under a temporary name and renamed into place, so a reader (or a run that
is killed) never sees half a file.

- `config.json`: the resolved configuration, `{"model": {...}, "train": {...}, "quant": {...},
  "eval": {...}}`, as `pgbuild presets --json` prints a preset.
- `train_log.jsonl`: one JSON object per logged training step, rewritten as training goes:
  `step, loss, lr_mul, looping, qat, seconds, tokens_per_second`.
- `loss.png`: training loss and LR multiplier against step (needs matplotlib); the log has at
  least ~50 points however short the run (see `train.log_every`).
- `checkpoint.pt` (train-and-pack with `train.checkpoint_every` > 0): resumable with
  `pgbuild train --resume`.
- `summary.json` (train-and-pack): ONE FLAT JSON OBJECT, every value a number, string, bool or
  null, for `pgbuild runs compare`:
  - the artifact: `path`, `bytes`, `budget_bytes`, `headroom`;
  - build-time figures: `eval_tokens`, `prequant_bpb`, and `<mode>_bpb`, `<mode>_seconds` for
    each mode scored (`standard`, `sliding`, `ttt`), and the baselines on the same tokens,
    `uniform_bpb` and `unigram_bpb` (runtime/baselines.py);
  - where the time went (builder/timebudget.py): `train_seconds`, `hessians_seconds`,
    `gptq_seconds` (GPTQ + budget fit), `compress_seconds`, `serialize_seconds` (writing the
    file), each estimated stage's `<stage>_estimate_seconds`, `artifact_production_wallclock`
    (every second until the artifact exists), `counted_seconds` (the stages `time_rule` counts),
    `wallclock_limit_seconds`, `within_wallclock`, `eval_seconds` (after the artifact is written,
    off the clock), `repack_seconds` (rewriting it with the figures, off the clock too), and
    `stopped_by` (`step cap` or `wallclock`: which rule ended training);
  - provenance: `seed`, `steps`, `world_size`, `weights` (ema / swa / last), `reserve_seconds`,
    `setup_seconds` (compile warmup and reserve estimate, off the clock), `compilations` (graphs
    torch.compile built for the training forward; 0 when eager), `pgbuild_commit`,
    `torch`, `python`, `date`;
  - `preset` (the name the run started from) and `run_dir`.
  Nested parts of the `--json` summary (per-tensor bits and reports) are left out.
"""

import json
import os

from runtime.errors import PgError
from runtime.files import atomic_path, write_atomic

CONFIG, LOG, PLOT, CHECKPOINT, SUMMARY = "config.json", "train_log.jsonl", "loss.png", "checkpoint.pt", "summary.json"


def flat_summary(summary, **extra):
    """The scalar fields of a `--json` summary, plus `extra`."""
    scalar = (int, float, str, bool, type(None))
    return {**{k: v for k, v in summary.items() if isinstance(v, scalar)}, **extra}


class RunDir:
    def __init__(self, path):
        self.path = os.path.abspath(path)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise PgError(f"--run-dir {path}: exists and is not a directory")
        os.makedirs(self.path, exist_ok=True)

    def file(self, name):
        return os.path.join(self.path, name)

    def write_config(self, preset):
        write_atomic(self.file(CONFIG), (json.dumps(preset.to_dict(), indent=1) + "\n").encode())

    def write_log(self, entries):
        write_atomic(self.file(LOG), "".join(json.dumps(e) + "\n" for e in entries).encode())

    def write_summary(self, summary, preset_name):
        flat = flat_summary(summary, preset=preset_name, run_dir=self.path)
        write_atomic(self.file(SUMMARY), (json.dumps(flat, indent=1) + "\n").encode())
        return flat

    def write_loss_plot(self, entries):
        """Returns False (and writes nothing) when matplotlib is missing or there is no log."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            return False
        if not entries:
            return False
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        steps = [e["step"] for e in entries]
        ax.plot(steps, [e["loss"] for e in entries], color="#4c72b0", label="train loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        lr = ax.twinx()
        lr.plot(steps, [e["lr_mul"] for e in entries], color="#dd8452", alpha=0.6, label="lr_mul")
        lr.set_ylabel("lr multiplier")
        lr.set_ylim(0, 1.05)
        marks = {}  # first logged step where a switch shows as on -> its labels
        for key, label in (("looping", "recurrence on"), ("qat", "QAT on")):
            first = next((e["step"] for e in entries if e.get(key)), None)
            if first is not None and first != steps[0]:
                marks.setdefault(first, []).append(label)
        for step, labels in marks.items():
            ax.axvline(step, color="#999999", linestyle="--", linewidth=1)
            ax.annotate(", ".join(labels), (step, 0.98), xycoords=("data", "axes fraction"), rotation=90,
                        va="top", ha="right", fontsize=8, color="#666666")
        fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)  # clear of the title
        ax.set_title(os.path.basename(self.path))
        with atomic_path(self.file(PLOT), "loss plot") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        return True
