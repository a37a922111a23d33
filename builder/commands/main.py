"""The `pgbuild` command line (click + rich)."""

import json

import click
from rich import box
from rich.console import Console
from rich.table import Table

from builder.commands.audit import audit, report_console
from builder.commands.data import data
from builder.commands.group import PgGroup
from builder.commands.launch import launch_options, maybe_relaunch
from builder.commands.runs import record, runs
from builder.commands.threads import threads_option
from builder.commands.verify import verify
from builder.config import SECTIONS, Preset, apply_overrides, field_docs
from builder.presets import PRESETS, RECIPES, apply_recipe, get_preset, load_toml
from runtime.config import MODES
from runtime.errors import PgError

console = Console(stderr=True)


@click.group(cls=PgGroup)
def main():
    """pgbuild: train, quantize and pack Parameter Golf models into one self-scoring artifact.py."""


def _set_help():
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}.*: " + ", ".join(field_docs(cls)))
    return "override one field, e.g. model.num_layers=4 (repeatable; `pgbuild presets` documents each field). " \
        + "; ".join(lines)


def resolve_preset(name, config_file, assignments, recipe=None):
    """Preset, then config file, then recipe, then --set: later ones win."""
    preset = get_preset(name)
    if config_file:
        table = load_toml(config_file)
        merged = preset.to_dict()
        for section, values in table.items():
            if not isinstance(values, dict):
                raise PgError(f"{config_file}: top-level key {section!r} must be a [section] table")
            merged.setdefault(section, {}).update(values)
        preset = Preset.from_dict(merged)
    if recipe:
        preset = apply_recipe(preset, recipe)
    return apply_overrides(preset, assignments)


def preset_options(f, default="tiny", default_help=None):
    f = click.option("--set", "assignments", multiple=True, metavar="SECTION.FIELD=VALUE", help=_set_help())(f)
    f = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="TOML file with [model], [train], [quant], [eval] tables")(f)
    f = click.option("--preset", default=default, show_default=default_help is None, type=click.Choice(list(PRESETS)),
                     help="named configuration" + (f" (default: {default_help})" if default_help else ""))(f)
    return f


def allow_overtime_option(f):
    return click.option("--allow-overtime", is_flag=True,
                        help="keep a build whose counted stages ran past train.max_wallclock_seconds "
                             "(train.time_rule) instead of failing")(f)


def recipe_option(default, where):
    def decorate(f):
        return click.option("--recipe", default=default, show_default=default is not None,
                            metavar="|".join(RECIPES) + "|FILE.toml",
                            help=f"quantization recipe: a named set of quant.* fields, or a TOML file of them "
                                 f"(default: {where})")(f)
    return decorate


def _train(preset, data, run=None, checkpoint=None, resume=None):
    """Train; `run` (a RunDir) gets the config, log and loss plot, `checkpoint` (a path) the
    resumable state every train.checkpoint_every steps and at the end."""
    from builder.pipeline import prepare_data
    from builder.train.trainer import setup_context, train

    ctx = setup_context(preset.train.require_cuda)
    layout = prepare_data(data, preset)
    main_rank = ctx.is_main
    if main_rank:
        console.print(f"[bold]training[/] on {ctx.device} x{ctx.world}: {preset.model.num_layers} layers x "
                      f"{preset.model.model_dim}, {preset.train.batch_tokens:,} tokens/step")
        if run is not None:
            run.write_config(preset)
    result = train(preset, layout, ctx, report=console.print if main_rank else (lambda *_: None), resume=resume,
                   save=_checkpoint_saver(checkpoint, preset, ctx) if checkpoint else None,
                   on_log=run.write_log if run is not None and main_rank else None)
    if run is not None and main_rank and not run.write_loss_plot(result.log):
        console.print("no loss.png: matplotlib is not installed (pip install 'pgbuild[plot]')")
    return ctx, layout, result


def _checkpoint_saver(path, preset, ctx):
    from builder.checkpoint import save_checkpoint
    from builder.provenance import of_training

    def save(trainer):
        state = trainer.state_dict()  # every rank: it gathers Muon's momentum
        if ctx.is_main:
            save_checkpoint(path, trainer.final_weights(), preset, of_training(preset, trainer.result(), ctx.world),
                            training=state)
    return save


def _run_dir(path):
    from builder.rundir import RunDir
    return RunDir(path) if path else None


def _print_result(summary, as_json):
    if as_json:
        click.echo(json.dumps(summary))
        return
    table = Table(title="artifact", show_header=False)
    for key, value in summary.items():
        if key not in ("bits", "encodings", "tensors"):
            table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    report_console().print(table)


@main.command("train-and-pack")
@preset_options
@threads_option
@launch_options
@click.option("--data", required=True, type=click.Path(), help="dataset directory (pgbuild or challenge layout)")
@click.option("--out", default="artifact.py", show_default=True, type=click.Path(), help="artifact file to write")
@click.option("--budget-bytes", type=int,
              help="hard cap on the artifact's size (default: quant.budget_bytes = 16,000,000)")
@click.option("--eval-tokens", default=1_000_000, show_default=True, help="validation prefix scored at build time")
@click.option("--eval-modes", default="standard,sliding,ttt", show_default=True, help="modes scored at build time")
@recipe_option(None, "the preset's own quant section")
@allow_overtime_option
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="folder for config.json, train_log.jsonl, loss.png and summary.json (builder/rundir.py)")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
def train_and_pack(preset, config_file, assignments, nproc_per_node, nnodes, rdzv_endpoint, data, out, budget_bytes,
                   eval_tokens, eval_modes, recipe, allow_overtime, run_dir, as_json):
    """Train, quantize, fit the byte budget and write one self-contained artifact.py."""
    from builder.artifact.sources import installed_code
    from builder.pipeline import parse_modes, quantize_and_pack
    from builder.provenance import of_training
    from builder.rundir import CHECKPOINT

    maybe_relaunch(nproc_per_node, nnodes, rdzv_endpoint)
    preset_name = preset
    preset = resolve_preset(preset, config_file, assignments, recipe)
    if budget_bytes is not None:
        preset = apply_overrides(preset, [f"quant.budget_bytes={budget_bytes}"])
    if preset.train.checkpoint_every and not run_dir:
        raise PgError("train.checkpoint_every needs --run-dir (the checkpoint goes to RUN_DIR/checkpoint.pt)")
    run = _run_dir(run_dir)
    checkpoint = run.file(CHECKPOINT) if run and preset.train.checkpoint_every else None
    modes = parse_modes(eval_modes)
    code = installed_code()  # before the clock starts: the same bytes for every build of this pgbuild
    ctx, layout, result = _train(preset, data, run, checkpoint)
    summary = quantize_and_pack(result.model, preset, layout, out, ctx, of_training(preset, result, ctx.world),
                                eval_tokens, modes, report=console.print if ctx.is_main else (lambda *_: None),
                                progress=_progress(as_json), allow_overtime=allow_overtime, code=code)
    if ctx.is_main:
        if run is not None:
            run.write_summary(summary, preset_name)
        _print_result(summary, as_json)


def _progress(as_json):
    """quantize_and_pack's progress bars: rich's on a terminal, none with --json."""
    from builder.pipeline import no_progress
    from builder.progress import scoring_progress
    return no_progress if as_json else scoring_progress


@main.command()
@preset_options
@threads_option
@launch_options
@click.option("--data", required=True, type=click.Path(), help="dataset directory")
@click.option("--out", default="checkpoint.pt", show_default=True, type=click.Path(), help="checkpoint to write")
@click.option("--resume", type=click.Path(dir_okay=False),
              help="continue the run saved in this checkpoint (its configuration, --set may change train.* "
                   "fields, e.g. train.iterations to extend it)")
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="folder for config.json, train_log.jsonl and loss.png (builder/rundir.py)")
def train(preset, config_file, assignments, nproc_per_node, nnodes, rdzv_endpoint, data, out, resume, run_dir):
    """Train only, writing a checkpoint for `pgbuild quantize` (or `pgbuild train --resume`)."""
    from builder.checkpoint import load_training_state

    maybe_relaunch(nproc_per_node, nnodes, rdzv_endpoint)
    state = None
    if resume:
        if config_file or any(a.strip().startswith("model.") for a in assignments):
            raise PgError("--resume takes its configuration from the checkpoint: no --config, and no --set model.*")
        preset, state = load_training_state(resume)
        preset = apply_overrides(preset, assignments)
    else:
        preset = resolve_preset(preset, config_file, assignments)
    ctx, _, _ = _train(preset, data, _run_dir(run_dir), checkpoint=out, resume=state)
    if ctx.is_main:
        console.print(f"wrote {out}")


@main.command()
@threads_option
@click.option("--checkpoint", required=True, type=click.Path(), help="checkpoint from `pgbuild train`")
@click.option("--data", required=True, type=click.Path(), help="dataset directory (training shards calibrate GPTQ)")
@click.option("--out", default="artifact.py", show_default=True, type=click.Path(), help="artifact file to write")
@click.option("--budget-bytes", type=int, help="hard cap on the artifact's size (default: the checkpoint's)")
@click.option("--set", "assignments", multiple=True, metavar="quant.FIELD=VALUE",
              help="override quantization/eval settings")
@click.option("--eval-tokens", default=1_000_000, show_default=True, help="validation prefix scored at build time")
@click.option("--eval-modes", default="standard,sliding,ttt", show_default=True, help="modes scored at build time")
@recipe_option("best", "best")
@allow_overtime_option
@click.option("--report", is_flag=True, help="print each tensor's encoding, bytes, bits per parameter and error")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
def quantize(checkpoint, data, out, budget_bytes, assignments, eval_tokens, eval_modes, recipe, allow_overtime, report,
             as_json):
    """Quantize a checkpoint, fit the budget and write the artifact, without retraining."""
    from builder.artifact.sources import installed_code
    from builder.checkpoint import load_checkpoint
    from builder.pipeline import parse_modes, prepare_data, quantize_and_pack
    from builder.train.trainer import setup_context

    ctx = setup_context()
    model, preset, prov = load_checkpoint(checkpoint, ctx.device)
    preset = apply_overrides(apply_recipe(preset, recipe),
                             list(assignments) + ([f"quant.budget_bytes={budget_bytes}"] if budget_bytes else []))
    layout = prepare_data(data, preset)
    summary = quantize_and_pack(model, preset, layout, out, ctx, prov, eval_tokens, parse_modes(eval_modes),
                                report=console.print, progress=_progress(as_json), allow_overtime=allow_overtime,
                                code=installed_code())
    if report and not as_json:
        _print_tensor_report(summary["tensors"])
    _print_result(summary, as_json)


def _print_tensor_report(rows):
    table = Table(title="quantized tensors")
    for column in ("tensor", "encoding", "bytes", "bits/param", "Hessian-weighted error"):
        # A tensor's name is what the row is for: the other columns give way on a narrow terminal.
        width = max(len(row["name"]) for row in rows) if column == "tensor" else None
        table.add_column(column, justify="left" if column in ("tensor", "encoding") else "right",
                         min_width=width, no_wrap=column == "tensor")
    for row in rows:
        table.add_row(row["name"], row["encoding"], f"{row['bytes']:,}", f"{row['bits_per_param']:.3f}",
                      f"{row['error']:.4g}")
    report_console().print(table)


@main.command("eval")
@threads_option
@click.option("--checkpoint", required=True, type=click.Path(), help="checkpoint from `pgbuild train`")
@click.option("--data", required=True, type=click.Path(), help="dataset directory")
@click.option("--mode", default="standard", show_default=True, type=click.Choice(MODES),
              help="evaluation mode")
@click.option("--max-val-tokens", type=int, help="score only a prefix of the validation stream")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def eval_checkpoint(checkpoint, data, mode, max_val_tokens, as_json):
    """The unquantized model's bpb, with the artifact's own evaluation code."""
    import sentencepiece as spm

    from builder.checkpoint import load_checkpoint
    from builder.pipeline import prepare_data, val_stream
    from builder.progress import scoring_progress
    from builder.train.trainer import setup_context
    from runtime.api import byte_counts
    from runtime.baselines import baselines, describe
    from runtime.evaluate import evaluate

    ctx = setup_context()
    model, preset, _ = load_checkpoint(checkpoint, ctx.device)
    layout = prepare_data(data, preset)
    tokens = val_stream(layout, preset, max_val_tokens)
    tables = byte_counts(layout, spm.SentencePieceProcessor(model_file=layout.tokenizer), preset.model.vocab_size,
                         tokens, layout.has_byte_sidecar())
    with scoring_progress(not as_json) as track:
        result = evaluate(model.eval(), tokens, tables, preset.eval, mode, ctx.device,
                          on_score=track(mode, len(tokens) - 1))
    summary = {**result.summary(), **baselines(tokens, tables, preset.model.vocab_size)}
    click.echo(json.dumps(summary) if as_json else
               f"mode {mode}  val_loss {summary['val_loss']:.6f}  val_bpb {summary['val_bpb']:.6f}"
               f"{describe(summary)}  tokens {summary['tokens']}  bytes {summary['bytes']}")


@main.command("import")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", required=True, type=click.Choice(["r0409", "r0427"]),
              help="whose checkpoint: r0409 / r0427 is the 2026-04-09 / 2026-04-27 record's final_model.pt")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="pgbuild checkpoint to write")
@lambda f: preset_options(f, default=None, default_help="the format's: record for r0409, r0427 for r0427")
def import_checkpoint(checkpoint, fmt, out, preset, config_file, assignments):
    """Turn another training script's weights into a pgbuild checkpoint (for eval and quantize);
    the preset (+ --config, --set) gives the shapes, which must match the file's exactly."""
    from builder.checkpoint import save_checkpoint
    from builder.train.importer import import_record

    preset = resolve_preset(preset or {"r0409": "record"}.get(fmt, fmt), config_file, assignments)
    state, prov = import_record(checkpoint, fmt, preset.model)
    save_checkpoint(out, state, preset, prov)
    click.echo(f"wrote {out}: {sum(t.numel() for t in state.values()):,} parameters, preset model "
               f"{preset.model.num_layers} layers x {preset.model.model_dim}")


@main.command()
@click.option("--section", "sections", multiple=True, type=click.Choice(list(SECTIONS)),
              help="show only this section (repeatable; default: all)")
@click.option("--json", "as_json", is_flag=True, help="print resolved presets as JSON")
def presets(sections, as_json):
    """List the named presets with their resolved configurations, section by section: a table of
    values, then what each field means."""
    sections = sections or tuple(SECTIONS)
    resolved = {name: {s: v for s, v in make().to_dict().items() if s in sections} for name, make in PRESETS.items()}
    if as_json:
        click.echo(json.dumps(resolved, indent=1))
        return
    out = report_console()
    for section in sections:
        docs = field_docs(SECTIONS[section])
        values = Table(title=f"[bold]{section}[/]", title_justify="left", box=box.SIMPLE_HEAD)
        values.add_column("field", no_wrap=True)
        for name in resolved:
            values.add_column(name, overflow="fold", min_width=len(name))
        meanings = Table.grid(padding=(0, 2))
        meanings.add_column(no_wrap=True, style="bold")
        meanings.add_column()
        for field_name, doc in docs.items():
            values.add_row(f"{section}.{field_name}", *(str(resolved[p][section][field_name]) for p in resolved))
            meanings.add_row(f"{section}.{field_name}", doc)
        out.print(values)
        out.print(meanings)
        out.print()


main.add_command(data)
main.add_command(audit)
main.add_command(verify)
main.add_command(runs)
main.add_command(record)
