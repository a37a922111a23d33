"""`pgbuild data`: get token shards, either built from your documents or downloaded."""

import contextlib
import json

import click
from huggingface_hub.utils import disable_progress_bars
from huggingface_hub.utils import logging as hf_logging
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from builder.commands.group import PgGroup
from builder.data import build as dataset_mod
from builder.data import download as download_mod
from runtime.data import CASEOPS_SUFFIX

STAGE_LABELS = {
    "scan": "checking documents",
    "tokenizer": "training tokenizer",
    "encode": "tokenizing documents",
    "download": "downloading files",
}


@contextlib.contextmanager
def _progress():
    """A rich progress display on stderr (stdout stays clean for --json); yields a callback."""
    console = Console(stderr=True)
    # Off when stderr is not a terminal: a log file wants no redraws, not even a stray newline.
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)
    tasks = {}

    def report(stage, done, total):
        if stage not in tasks:
            tasks[stage] = bar.add_task(STAGE_LABELS.get(stage, stage), total=total)
        bar.update(tasks[stage], completed=done, total=total)

    with bar:
        yield report


def _split_table(title, *numeric_columns):
    table = Table("split", title=title)
    for name in numeric_columns:
        table.add_column(name, justify="right")
    return table


def _print_summary(summary, as_json, table, notes):
    """One JSON object for machines, or a table plus unwrapped `key: value` lines for people."""
    if as_json:
        click.echo(json.dumps(summary))
        return
    console = Console()
    console.print(table)
    for key, value in notes:
        # soft_wrap: paths stay whole, so they can be copied from the terminal.
        console.print(f"[bold]{key}:[/bold] {value}", soft_wrap=True, highlight=False)


@click.group("data", cls=PgGroup)
def data():
    """Get token shards: build them from your own documents, or download the challenge's."""


@data.command("build", short_help="Train a tokenizer on your documents and write shards.")
@click.option("--input", "input_path", required=True, metavar="DOCS.jsonl[.xz]",
              help='Documents, one JSON object {"text": ...} per line; .xz-compressed is fine.')
@click.option("--vocab-size", required=True, type=int,
              help=f"SentencePiece vocabulary size ({dataset_mod.MIN_VOCAB}..{dataset_mod.MAX_VOCAB}).")
@click.option("--out", "out_dir", required=True, metavar="DIR",
              help="Output folder for tokenizer.model and fineweb_{val,train}_NNNNNN.bin shards.")
@click.option("--val-docs", default=dataset_mod.DEFAULT_VAL_DOCS, show_default=True, type=int,
              help="The first K documents are validation, the rest training (the challenge's rule).")
@click.option("--tokenizer-train-docs", default=dataset_mod.DEFAULT_TOKENIZER_TRAIN_DOCS, show_default=True,
              type=int, help="Train the tokenizer on at most this many training documents.")
@click.option("--shard-tokens", default=dataset_mod.DEFAULT_SHARD_TOKENS, show_default=True, type=int,
              help="Tokens per shard file.")
@click.option("--caseops", is_flag=True,
              help="Apply the 2026-04-27 record's lossless capitalization transform (CaseOps) first, reserve its "
                   "controls as pieces, and write fineweb_val_bytes_NNNNNN.bin sidecars so that evaluation "
                   "counts the original text's bytes.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def build(input_path, vocab_size, out_dir, val_docs, tokenizer_train_docs, shard_tokens, caseops, as_json):
    """Train a BPE tokenizer on DOCS' training docs and write val/train shards to DIR."""
    with _progress() as report:
        s = dataset_mod.build_dataset(input_path, vocab_size, out_dir, val_docs=val_docs, progress=report,
                                      tokenizer_train_docs=tokenizer_train_docs, shard_tokens=shard_tokens,
                                      case_ops=caseops)
    table = _split_table("dataset built", "docs", "tokens", "shards")
    for split in ("val", "train"):
        table.add_row(split, f"{s['docs_' + split]:,}", f"{s['tokens_' + split]:,}", str(len(s["shards_" + split])))
    notes = [("shards", s["out_dir"]),
             ("tokenizer", f"{s['tokenizer']} ({s['vocab_size']:,} pieces, "
                           f"trained on {s['tokenizer_train_docs']:,} docs)")]
    if s["text_transform"]:
        notes.append(("text transform", f"{s['text_transform']}: each validation token's bytes in the original text "
                                        "are in fineweb_val_bytes_NNNNNN.bin, which evaluation counts"))
    _print_summary(s, as_json, table, notes)


@data.command("download", short_help="Fetch the challenge's pre-tokenized FineWeb shards.")
@click.option("--variant", default="sp8192", show_default=True,
              help="Tokenization to fetch: the repo's fineweb10B_<VARIANT> dataset (sp1024, sp8192, byte260, ...).")
@click.option("--caseops", is_flag=True,
              help="The CaseOps export of VARIANT (fineweb10B_<VARIANT>" + CASEOPS_SUFFIX + ", the 2026-04-27 "
                   "record's data), with the fineweb_val_bytes_NNNNNN.bin sidecars that evaluation counts.")
@click.option("--train-shards", default=80, show_default=True, type=int,
              help="Download the first N train shards (all val shards always come).")
@click.option("--out", "out_dir", default="data", show_default=True, metavar="DIR",
              help="Destination; files land in DIR/datasets/fineweb10B_<VARIANT>/ and DIR/tokenizers/.")
@click.option("--repo-id", default=None, metavar="OWNER/NAME",
              help="Hugging Face dataset repo holding manifest.json and the shards. Default: where the variant "
                   "is published (" + ", ".join(f"{v}: {r}" for v, r in download_mod.PUBLISHED_IN.items()) +
                   f"; others: {download_mod.DEFAULT_REPO_ID}).")
@click.option("--remote-root", default=download_mod.DEFAULT_REMOTE_ROOT, show_default=True,
              help="Folder inside the repo that holds manifest.json, datasets/ and tokenizers/.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def download(variant, caseops, train_shards, out_dir, repo_id, remote_root, as_json):
    """Fetch the challenge's pre-tokenized FineWeb shards and tokenizer from the hub."""
    if caseops and not variant.endswith(CASEOPS_SUFFIX):
        variant += CASEOPS_SUFFIX
    # The hub client's own per-file bars would fight with rich's display, and its warnings
    # would repeat, less clearly, the one error line we print.
    disable_progress_bars()
    hf_logging.set_verbosity_error()
    with _progress() as report:
        s = download_mod.download(variant=variant, train_shards=train_shards, out_dir=out_dir,
                                  repo_id=repo_id, remote_root=remote_root, progress=report)
    table = _split_table(f"{variant} shards", "files")
    table.add_row("val", str(s["files_val"]))
    if s["files_val_bytes"]:
        table.add_row("val bytes", str(s["files_val_bytes"]))
    table.add_row("train", str(s["files_train"]))
    notes = [("source", s["repo_id"]), ("shards", s["dataset_dir"]), ("tokenizer", s["tokenizer"]),
             ("files", f"{s['downloaded']} downloaded, {s['skipped']} already present")]
    _print_summary(s, as_json, table, notes)
