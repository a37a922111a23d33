"""pgbuild against the 2026-04-09 record's own code (../shared/reference/r0409_train_gpt.py).

Both run on the CPU in fp32 at reduced shapes, on the same weights (the record's init, perturbed so
that attention and the MLPs matter, converted by builder.train.importer.from_r0409) and the same
validation tokens of the demo dataset. Logits, byte counts and the bpb of every evaluation mode the
record has must agree; a record checkpoint must import, evaluate and pack through the CLI.
"""

import copy
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import run_artifact, run_pgbuild
from oracle import load_reference

from builder.commands.main import main
from builder.train.importer import from_r0409
from runtime.config import EvalConfig, ModelConfig
from runtime.errors import PgError
from runtime.evaluate import byte_tables, evaluate, target_bytes
from runtime.model import GPT

SEQ_LEN = 128
VAL_SEQS = 16  # scored prefix: VAL_SEQS sequences plus the final target
TTT_BATCH_SEQS = 2  # eval_val_ttt's batch_seqs (32 in the record): several TTT steps per epoch here
REDUCED = dict(VOCAB_SIZE=1024, NUM_LAYERS=4, MODEL_DIM=64, EMBEDDING_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2,
               ROPE_DIMS=8, LOOP_START=1, LOOP_END=2, NUM_LOOPS=2, PARALLEL_RESIDUAL_START=2, XSA_LAST_N=3,
               QK_GAIN_INIT=5.25, TRAIN_SEQ_LEN=SEQ_LEN, EVAL_SEQ_LEN=SEQ_LEN, EVAL_STRIDE=32,
               VAL_BATCH_TOKENS=8 * 4 * SEQ_LEN, TTT_CHUNK_TOKENS=4 * SEQ_LEN, TTT_EPOCHS=2, TTT_LR=0.01)


def pgbuild_configs(h):
    """The ModelConfig and EvalConfig that mean what the record's Hyperparameters `h` mean."""
    model = ModelConfig(vocab_size=h.vocab_size, num_layers=h.num_layers, model_dim=h.model_dim,
                        num_heads=h.num_heads, num_kv_heads=h.num_kv_heads, mlp_mult=h.mlp_mult,
                        rope_dims=h.rope_dims, rope_base=h.rope_base, qk_gain_init=h.qk_gain_init,
                        logit_softcap=h.logit_softcap, tie_embeddings=h.tie_embeddings,
                        embed_init_std=h.tied_embed_init_std, ln_scale=h.ln_scale,
                        skip_gates=h.skip_gates_enabled, loop_start=h.loop_start, loop_end=h.loop_end,
                        num_loops=h.num_loops, parallel_residual_start=h.parallel_residual_start,
                        xsa_last_n=h.xsa_last_n)
    # The record clips TTT gradients at 1; batch sizes are its eval functions' arguments.
    evalc = EvalConfig(seq_len=h.eval_seq_len, stride=h.eval_stride, batch_seqs=32,
                       ttt_chunk_tokens=h.ttt_chunk_tokens, ttt_epochs=h.ttt_epochs, ttt_lr=h.ttt_lr,
                       ttt_momentum=h.ttt_momentum, ttt_grad_clip=1.0, ttt_batch_seqs=TTT_BATCH_SEQS)
    return model, evalc


@pytest.fixture(scope="module")
def challenge_dir(demo_data, tmp_path_factory):
    """The demo dataset in the challenge's layout, which the record's script reads."""
    root = tmp_path_factory.mktemp("challenge")
    shards = root / "datasets" / "fineweb10B_sp1024"
    shards.mkdir(parents=True)
    for shard in demo_data.glob("fineweb_*.bin"):
        (shards / shard.name).symlink_to(shard)
    (root / "tokenizers").mkdir()
    (root / "tokenizers" / "fineweb_1024_bpe.model").symlink_to(demo_data / "tokenizer.model")
    return root


@pytest.fixture(scope="module")
def ref(challenge_dir):
    return load_reference("r0409", DATA_DIR=challenge_dir, **REDUCED)


@pytest.fixture(scope="module")
def setup(ref):
    """(hyperparameters, validation data on the scored prefix, record model, pgbuild configs)."""
    h = ref.Hyperparameters()
    val = ref.ValidationData(h, torch.device("cpu"))
    val.val_tokens = val.val_tokens[:VAL_SEQS * SEQ_LEN + 1]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ref.GPT(h).float()
        with torch.no_grad():  # the init zeroes every output projection: give every path a say
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
            # The record trains in bf16 and keeps only linear layers and control tensors in fp32.
            model.tok_emb.weight.copy_(model.tok_emb.weight.bfloat16())
    model.looping_active = True  # the record evaluates with its recurrence on
    model_cfg, eval_cfg = pgbuild_configs(h)
    return h, val, model, model_cfg, eval_cfg


def pgbuild_model(setup):
    _, _, model, model_cfg, _ = setup
    gpt = GPT(model_cfg)
    gpt.load_state_dict(from_r0409(model.state_dict(), model_cfg))
    return gpt.eval()


def ref_tokens(setup):
    return setup[1].val_tokens.numpy()


@pytest.fixture(scope="module")
def tables(setup, demo_data):
    import sentencepiece as spm
    return byte_tables(spm.SentencePieceProcessor(model_file=str(demo_data / "tokenizer.model")), 1024)


@pytest.mark.parametrize("looping", [True, False])
def test_logits_match_the_record(setup, looping):
    _, val, model, _, _ = setup
    gpt = pgbuild_model(setup)
    model.looping_active, gpt.looping = looping, looping
    ids = val.val_tokens[:2 * SEQ_LEN].long().view(2, SEQ_LEN)
    try:
        with torch.no_grad():
            delta = (model.forward_logits(ids) - gpt(ids)).abs().max().item()
    finally:
        model.looping_active = True
    assert delta <= 1e-5


def test_rope_conversion_is_what_makes_them_match(setup):
    """Renaming alone is not enough: the record's RoPE turns the other way."""
    _, val, model, model_cfg, _ = setup
    state = from_r0409(model.state_dict(), model_cfg)
    for i in range(model_cfg.num_layers):
        for ours, theirs in (("q", "c_q"), ("k", "c_k")):
            state[f"blocks.{i}.attn.{ours}.weight"] = model.state_dict()[f"blocks.{i}.attn.{theirs}.weight"]
    gpt = GPT(model_cfg)
    gpt.load_state_dict(state)
    ids = val.val_tokens[:SEQ_LEN].long()[None]
    with torch.no_grad():
        assert (model.forward_logits(ids) - gpt.eval()(ids)).abs().max().item() > 1e-3


def test_yarn_matches_the_record(setup):
    """Beyond its training length the record NTK-scales its RoPE base; so does rope_yarn_len."""
    _, val, model, model_cfg, _ = setup
    model = copy.deepcopy(model)
    for block in model.blocks:  # as if it had trained on half the rows' length
        block.attn.rotary.train_seq_len, block.attn.rotary._cos_cached = SEQ_LEN // 2, None
    gpt = GPT(ModelConfig(**{**model_cfg.to_dict(), "rope_yarn_len": SEQ_LEN // 2}))
    gpt.load_state_dict(from_r0409(model.state_dict(), model_cfg))
    ids = val.val_tokens[:2 * SEQ_LEN].long().view(2, SEQ_LEN)
    with torch.no_grad():
        theirs = model.forward_logits(ids)
        assert (theirs - gpt.eval()(ids)).abs().max().item() <= 1e-5
        assert (theirs - pgbuild_model(setup)(ids)).abs().max().item() > 1e-3


def test_byte_counts_match_the_record(setup, tables, ref):
    h, val, model, _, _ = setup
    ref_tables = [t.numpy() for t in ref.build_sentencepiece_luts(val.sp, h.vocab_size, torch.device("cpu"))]
    for ours, theirs in zip(tables, ref_tables):
        assert np.array_equal(ours, theirs.astype(ours.dtype))
    # eval_val's (loss, bpb) imply its byte count: bpb = loss / ln 2 * tokens / bytes.
    loss, bpb = ref.eval_val(h, torch.device("cpu"), val, model)
    tokens = VAL_SEQS * SEQ_LEN
    ours = int(target_bytes(ref_tokens(setup), tables).sum())
    assert abs(loss / math.log(2) * tokens / bpb - ours) < 1e-3 * ours / tokens


def _ref_bpb(setup, ref, mode):
    h, val, model, _, _ = setup
    device, model = torch.device("cpu"), copy.deepcopy(model)
    if mode == "ttt":
        return ref.eval_val_ttt(h, device, val, model, batch_seqs=TTT_BATCH_SEQS)[1]
    return {"standard": ref.eval_val, "sliding": ref.eval_val_sliding}[mode](h, device, val, model)[1]


@pytest.mark.parametrize("mode", ["standard", "sliding", "ttt"])
def test_bpb_matches_the_record(setup, ref, tables, mode):
    eval_cfg = setup[4]
    ours = evaluate(pgbuild_model(setup), ref_tokens(setup), tables, eval_cfg, mode, torch.device("cpu"))
    assert abs(ours.val_bpb - _ref_bpb(setup, ref, mode)) <= 1e-6


def test_from_r0409_rejects_what_is_not_the_record(setup):
    _, _, model, model_cfg, _ = setup
    state = model.state_dict()
    with pytest.raises(PgError, match="blocks.1.attn.c_k.weight"):
        from_r0409({k: v for k, v in state.items() if k != "blocks.1.attn.c_k.weight"}, model_cfg)
    with pytest.raises(PgError, match="bigram.weight"):
        from_r0409({**state, "bigram.weight": torch.zeros(3)}, model_cfg)
    with pytest.raises(PgError, match="blocks.0.mlp.fc.weight"):
        from_r0409({**state, "blocks.0.mlp.fc.weight": torch.zeros(3, 64)}, model_cfg)
    with pytest.raises(PgError, match="state dict"):
        from_r0409([torch.zeros(3)], model_cfg)


# --- the CLI: a record checkpoint -> pgbuild import -> eval -> quantize -> artifact.py eval -------

def import_settings(h):
    """--set flags giving the record preset the reduced shapes and CPU-sized eval and calibration."""
    values = dict(vocab_size=h.vocab_size, num_layers=h.num_layers, model_dim=h.model_dim, num_heads=h.num_heads,
                  num_kv_heads=h.num_kv_heads, rope_dims=h.rope_dims, loop_start=h.loop_start,
                  loop_end=h.loop_end, parallel_residual_start=h.parallel_residual_start,
                  xsa_last_n=h.xsa_last_n)
    flags = [f"model.{k}={v}" for k, v in values.items()]
    flags += [f"eval.seq_len={h.eval_seq_len}", f"eval.stride={h.eval_stride}",
              "quant.calibration_batches=2", f"quant.calibration_batch_tokens={8 * SEQ_LEN}",
              "quant.probe_tokens=2048", "quant.passthrough_max_numel=4096", "quant.gptq_block=64"]
    return [arg for flag in flags for arg in ("--set", flag)]


@pytest.fixture(scope="module")
def record_checkpoint(setup, tmp_path_factory):
    """What the record's serialize() writes first: torch.save(base_model.state_dict())."""
    path = tmp_path_factory.mktemp("record") / "final_model.pt"
    state = setup[2].state_dict()
    torch.save({**state, "tok_emb.weight": state["tok_emb.weight"].bfloat16()}, path)
    return path


def test_imported_record_evaluates_and_packs(setup, ref, record_checkpoint, demo_data, clean_env, tmp_path):
    h = setup[0]
    ckpt = tmp_path / "imported.pt"
    run_pgbuild("import", record_checkpoint, "--format", "r0409", "--out", ckpt, *import_settings(h))
    proc = run_pgbuild("eval", "--checkpoint", ckpt, "--data", demo_data,
                       "--max-val-tokens", VAL_SEQS * SEQ_LEN + 1, "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == VAL_SEQS * SEQ_LEN
    assert abs(result["val_bpb"] - _ref_bpb(setup, ref, "standard")) <= 1e-5
    out = tmp_path / "artifact.py"
    run_pgbuild("quantize", "--checkpoint", ckpt, "--data", demo_data, "--out", out, "--recipe", "best",
                "--eval-tokens", VAL_SEQS * SEQ_LEN + 1, "--eval-modes", "standard",
                "--set", "quant.codecs=lzma", "--set", "quant.rd_bits=5,6")  # fewer candidates: CPU time
    proc = run_artifact(out, "eval", "--data", demo_data, "--max-val-tokens", VAL_SEQS * SEQ_LEN + 1, "--json",
                        env=clean_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    quantized = json.loads(proc.stdout.strip().splitlines()[-1])
    assert quantized["tokens"] == VAL_SEQS * SEQ_LEN and abs(quantized["val_bpb"] - result["val_bpb"]) < 0.05


def _broken(state, kind):
    if kind == "missing":
        return {k: v for k, v in state.items() if k != "blocks.2.attn.c_q.weight"}
    if kind == "extra":
        return {**state, "blocks.2.attn.bogus": torch.zeros(4)}
    if kind == "shape":
        return {**state, "blocks.2.attn.c_q.weight": torch.zeros(64, 32)}
    return [v for v in state.values()]


@pytest.mark.parametrize("kind,named", [("missing", "blocks.2.attn.c_q.weight"), ("extra", "blocks.2.attn.bogus"),
                                        ("shape", "blocks.2.attn.c_q.weight"), ("list", "state dict")])
def test_import_rejects_a_checkpoint_that_does_not_fit(setup, tmp_path, kind, named):
    bad = tmp_path / "bad.pt"
    torch.save(_broken(setup[2].state_dict(), kind), bad)
    args = ["import", str(bad), "--format", "r0409", "--out", str(tmp_path / "out.pt"), *import_settings(setup[0])]
    result = CliRunner().invoke(main, args)  # in-process: the subprocess path is covered above
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0]
    assert list(tmp_path.iterdir()) == [bad]
