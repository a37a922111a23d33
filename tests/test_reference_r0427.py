"""pgbuild against the 2026-04-27 record's own code (../shared/reference/r0427_train_gpt.py).

Both run on the CPU in fp32 at reduced shapes with the record's features on (document-masked
attention, the two-lane decoder, the sparse attention gate, BOS-masked SmearGate, CaseOps byte
counting), on the same weights (the record's init, perturbed so that every path matters,
converted by builder.train.importer.from_r0427) and the same validation tokens of a CaseOps build
of the fixture. The record's FlashAttention kernels run as SDPA (its variable-length one as one
SDPA call per document, bench/reference.py), its Triton kernels are off.
"""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import run_pgbuild
from oracle import load_reference

from builder.commands.main import main
from builder.config import QuantConfig
from builder.train.importer import from_r0427
from runtime.config import EvalConfig, ModelConfig
from runtime.data import find_data, load_tokens
from runtime.errors import PgError
from runtime.evaluate import SidecarBytes, evaluate
from runtime.lora_ttt import DocAdapters
from runtime.model import GPT

SEQ_LEN = 128
VAL_SEQS = 36  # 4,608 tokens: two documents start inside a row (the fixture's run 1,000-4,000 tokens)
BOS_ID = 1
REDUCED = dict(VOCAB_SIZE=1024, NUM_LAYERS=5, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=8,
               LOOP_START=1, LOOP_END=2, NUM_LOOPS=2, PARALLEL_START_LAYER=3, XSA_LAST_N=5, QK_GAIN_INIT=5.0,
               TRAIN_SEQ_LEN=SEQ_LEN, EVAL_SEQ_LEN=SEQ_LEN, ROPE_TRAIN_SEQ_LEN=SEQ_LEN,
               # eval_val's batch is VAL_BATCH_TOKENS / (world 1 x 8 accumulation steps): one sequence,
               # so its document segments are exactly those of pgbuild's rows.
               VAL_BATCH_TOKENS=8 * SEQ_LEN, FUSED_CE_ENABLED=0, SMEAR_GATE_ENABLED=1, SPARSE_ATTN_GATE_ENABLED=1,
               SPARSE_ATTN_GATE_SCALE=0.5, GATE_WINDOW=12, CASEOPS_ENABLED=1)
MODEL = ModelConfig(vocab_size=1024, num_layers=5, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8,
                    qk_gain_init=5.0, loop_start=1, loop_end=2, num_loops=2, parallel_residual_start=3,
                    parallel_lanes=2, xsa_last_n=5, smear_gate=True, attn_gate="sparse", gate_window=12,
                    doc_mask=True)


@pytest.fixture(scope="module")
def ref(caseops_data):
    module = load_reference("r0427", DATA_PATH=caseops_data, TOKENIZER_PATH=caseops_data / "tokenizer.model",
                            **REDUCED)
    module.BOS_ID = BOS_ID  # the record sets it when its first loader or eval starts
    return module


@pytest.fixture(scope="module")
def setup(ref):
    """(hyperparameters, validation data on the scored prefix, record model)."""
    h = ref.Hyperparameters()
    val = ref.ValidationData(h, torch.device("cpu"))
    val.val_tokens = val.val_tokens[:VAL_SEQS * SEQ_LEN + 1]
    val.val_bytes = val.val_bytes[:VAL_SEQS * SEQ_LEN + 1]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ref.GPT(h).float()
        with torch.no_grad():  # the init zeroes output projections and gates: give every path a say
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    model.looping_active = True  # the record evaluates with its recurrence on
    return h, val, model.eval()


def pgbuild_model(setup, cfg=MODEL):
    gpt = GPT(cfg)
    gpt.load_state_dict(from_r0427(setup[2].state_dict(), cfg))
    return gpt.eval()


def rows_with_documents_inside(val):
    """Validation rows where a document starts after the first position, and those starts."""
    rows = val.val_tokens[:VAL_SEQS * SEQ_LEN].long().view(VAL_SEQS, SEQ_LEN)
    picked = [r for r in range(VAL_SEQS) if (rows[r, 1:] == BOS_ID).any()]
    assert picked, "the fixture's validation rows hold no document boundary"
    return rows[picked]


def record_logits(ref, model, row):
    """The record's forward_logits on one row, its documents segmented as its eval_val does."""
    starts = (row == BOS_ID).nonzero().flatten().tolist()
    cu_seqlens, longest = ref._build_cu_seqlens(starts, row.numel(), row.device, SEQ_LEN, 64)
    return model.forward_logits(row[None], cu_seqlens=cu_seqlens, max_seqlen=longest)[0]


@pytest.mark.parametrize("looping", [True, False])
def test_logits_match_the_record(ref, setup, looping):
    _, val, model = setup
    gpt = pgbuild_model(setup)
    rows = rows_with_documents_inside(val)
    model.looping_active, gpt.looping = looping, looping
    try:
        with torch.no_grad():
            theirs = torch.stack([record_logits(ref, model, row) for row in rows])
            delta = (theirs - gpt(rows)).abs().max().item()
    finally:
        model.looping_active = True
    assert delta <= 1e-5


def test_document_masking_is_what_makes_them_match(ref, setup):
    """Without the mask, every row's tokens after a document boundary read the previous document."""
    _, val, model = setup
    rows = rows_with_documents_inside(val)
    unmasked = pgbuild_model(setup, ModelConfig(**{**MODEL.to_dict(), "doc_mask": False}))
    with torch.no_grad():
        theirs = torch.stack([record_logits(ref, model, row) for row in rows])
        assert (theirs - unmasked(rows)).abs().max().item() > 1e-3


def test_a_document_is_scored_as_if_alone(setup):
    """Changing the first document of a row leaves every later document's logits unchanged."""
    _, val, _ = setup
    gpt = pgbuild_model(setup)
    row = rows_with_documents_inside(val)[:1]
    start = int((row[0, 1:] == BOS_ID).nonzero()[0]) + 1
    changed = row.clone()
    changed[0, 1:start] = torch.randint(4, 1024, (start - 1,))
    with torch.no_grad():
        assert torch.equal(gpt(row)[0, start:], gpt(changed)[0, start:])
        assert not torch.equal(gpt(row)[0, :start], gpt(changed)[0, :start])


def test_lora_adapters_act_where_the_records_do(ref, setup):
    """The record's hand-written TTT forward (forward_ttt, its two-lane copy included) against
    pgbuild's one forward with DocAdapters, on the same nonzero per-document adapters."""
    h, val, model = setup
    rank, docs = 4, 2
    ids = val.val_tokens[:docs * SEQ_LEN + 1].long()  # the first document: no boundary inside
    x, y = ids[:-1].view(docs, SEQ_LEN), ids[1:].view(docs, SEQ_LEN)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        theirs = ref.BatchedTTTLoRA(docs, model, rank)
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(0.05 * torch.randn_like(p))
    cfg = EvalConfig(seq_len=SEQ_LEN, lora_rank=rank, lora_alpha=theirs.lm_head_lora._scale * rank)
    ours = DocAdapters(MODEL, len(MODEL.layer_order(True)), cfg, docs, docs).reset(range(docs))
    pairs = [(ours.head, theirs.lm_head_lora)] + [
        (ours.layers[slot][name], getattr(theirs, f"{name}_loras")[slot])
        for slot in range(len(ours.layers)) for name in ("q", "k", "v", "o", "mlp")]
    with torch.no_grad():
        for (mine, record), name in zip(pairs, ["head"] + ["q", "k", "v", "o", "mlp"] * len(ours.layers)):
            # Theirs is x A^T B^T with A (docs, rank, in), B (docs, out, rank); the q and k deltas'
            # rotary outputs flip sign as the imported q and k rows do.
            b = record.B.transpose(1, 2).clone()
            if name in ("q", "k"):
                heads = b.view(docs, rank, -1, MODEL.head_dim)
                heads[..., MODEL.rope_dims // 2:MODEL.rope_dims] *= -1
            mine.a.copy_(record.A.transpose(1, 2))
            mine.b.copy_(b)
        ours.select(torch.arange(docs))
        delta = (model.forward_ttt(x, y, theirs) - pgbuild_model(setup)(x, y, adapters=ours)).abs().max().item()
        plain = (model.forward_ttt(x, y, theirs) - pgbuild_model(setup)(x, y)).abs().max().item()
    assert delta <= 1e-5 and plain > 1e-2


def test_training_loss_and_gradients_match_the_record(ref, setup):
    """One training row with a document boundary inside: the record's loss (its varlen segments,
    unfused eager path) and every gradient, mapped to pgbuild's tensors as the weights are."""
    _, val, model = setup
    record, gpt = copy.deepcopy(model).train(), pgbuild_model(setup).train()
    start = int((val.val_tokens == BOS_ID).nonzero().flatten()[1]) - SEQ_LEN // 2
    ids = val.val_tokens[start:start + SEQ_LEN + 1].long()
    x, y = ids[:-1][None], ids[1:][None]
    cu_seqlens, longest = ref._build_cu_seqlens((x[0] == BOS_ID).nonzero().flatten().tolist(), SEQ_LEN,
                                                x.device, SEQ_LEN, 64)
    theirs = record(x, y, cu_seqlens=cu_seqlens, max_seqlen=longest)
    ours = gpt(x, y, mean=True)
    theirs.backward()
    ours.backward()
    assert abs(theirs.item() - ours.item()) <= 1e-6
    grads = from_r0427({name: p.grad for name, p in record.named_parameters()}, MODEL)
    for name, p in gpt.named_parameters():
        assert torch.allclose(p.grad, grads[name], rtol=1e-4, atol=1e-7), name


def test_polar_express_newton_schulz_is_the_records():
    """Bit for bit, wide, tall and square (the record's own operation order: see newton_schulz)."""
    from builder.train.optim import newton_schulz

    ref_module = load_reference("r0427", **REDUCED)
    generator = torch.Generator().manual_seed(0)
    for shape in ((96, 64), (64, 96), (128, 128), (1024, 256)):
        g = torch.randn(*shape, generator=generator)
        assert torch.equal(newton_schulz(g, "polar_express", 5), ref_module.zeropower_via_newtonschulz5(g, steps=5))


def test_attention_gates_quantize_as_the_records_int8_rows(ref, setup):
    """The r0427 recipe stores attn.gate_w as the record's _quantize_gate_int8_row does (pgbuild
    rounds a row's fp16 scale up where rounding it down would clip the row's largest value)."""
    from builder.presets import RECIPES
    from builder.quant.policy import Quantizer

    state = pgbuild_model(setup).state_dict()
    quantizer = Quantizer(state, {}, dataclasses.replace(QuantConfig(), **RECIPES["r0427"]))
    assert quantizer.encode("smear.gate_w").enc == "fp16"  # other control tensors stay fp16
    for layer in range(MODEL.num_layers):
        name = f"blocks.{layer}.attn.gate_w"
        ours = quantizer.encode(name)
        codes, scales = ref._quantize_gate_int8_row(state[name])
        unclipped = scales.float() * 127 >= state[name].abs().amax(1)
        assert ours.enc == "int8" and unclipped.any()
        assert np.array_equal(ours.data[unclipped.numpy()], codes[unclipped].numpy())
        assert np.array_equal(ours.scales[unclipped.numpy()], scales[unclipped].numpy())
        assert torch.allclose(ours.dequantize(), state[name], atol=float(scales.float().max()) / 2 + 1e-7)


def test_byte_counts_match_the_record(ref, setup, caseops_data):
    h, val, model = setup
    layout = find_data(str(caseops_data), 1024)
    tokens = val.val_tokens.numpy()
    assert np.array_equal(load_tokens(layout, "val", len(tokens)), tokens)
    counts = SidecarBytes(load_tokens(layout, "val_bytes", len(tokens))).of(tokens)
    assert np.array_equal(counts, val.val_bytes[1:].numpy())
    # eval_val's (loss, bpb) imply its byte count: bpb = loss / ln 2 * tokens / bytes.
    loss, bpb = ref.eval_val(h, torch.device("cpu"), val, model)
    ours = int(counts.sum())
    assert abs(loss / math.log(2) * (len(tokens) - 1) / bpb - ours) < 1e-3


def test_standard_bpb_matches_the_record(ref, setup, caseops_data):
    """The record's eval_val (document-isolated, CaseOps bytes) against pgbuild's standard mode."""
    h, val, model = setup
    layout = find_data(str(caseops_data), 1024)
    tokens = val.val_tokens.numpy()
    counts = SidecarBytes(load_tokens(layout, "val_bytes", len(tokens)))
    ours = evaluate(pgbuild_model(setup), tokens, counts, EvalConfig(seq_len=SEQ_LEN, batch_seqs=4), "standard",
                    torch.device("cpu"))
    assert abs(ours.val_bpb - ref.eval_val(h, torch.device("cpu"), val, model)[1]) <= 1e-6


LORA = dict(rank=4, chunk=48, lr=1e-4)  # the record's chunk and LR (its rank is 80)


def start_as_pgbuild(record_adapters, doc_ids, cfg):
    """Give the record's BatchedTTTLoRA the A that pgbuild's adapters give these documents."""
    ours = DocAdapters(MODEL, len(MODEL.layer_order(True)), cfg, len(doc_ids), len(doc_ids)).reset(doc_ids)
    pairs = [(ours.head, record_adapters.lm_head_lora)] + [
        (ours.layers[slot][name], getattr(record_adapters, f"{name}_loras")[slot])
        for slot in range(len(ours.layers)) for name in ("q", "k", "v", "o", "mlp")]
    with torch.no_grad():
        for mine, record in pairs:
            record.A.copy_(mine.a.transpose(1, 2))


def test_lora_ttt_bpb_matches_the_record(ref, setup, caseops_data, monkeypatch):
    """The record's per-document LoRA TTT (eval_val_ttt_phased without a phase: all documents of
    the prefix in one batch) against pgbuild's lora mode, from the same adapter init."""
    h, val, model = setup
    # The record's run sets its Adam beta2 and weight decay (0.99, 0.5: its log), pgbuild's defaults.
    for name, value in dict(ttt_lora_rank=LORA["rank"], ttt_chunk_size=LORA["chunk"], ttt_eval_seq_len=SEQ_LEN,
                            ttt_lora_lr=LORA["lr"], ttt_beta2=0.99, ttt_weight_decay=0.5,
                            phased_ttt_prefix_docs=0).items():
        monkeypatch.setattr(h, name, value)
    tokens = val.val_tokens.numpy()
    cfg = EvalConfig(seq_len=SEQ_LEN, lora_chunk_tokens=LORA["chunk"], lora_rank=LORA["rank"], lora_lr=LORA["lr"],
                     lora_phase_docs=0, lora_group_rows=4)
    docs = ref._find_docs(val.val_tokens)
    in_batch_order = sorted(range(len(docs)), key=lambda d: docs[d][1])  # the record batches by length

    class SameInit(ref.BatchedTTTLoRA):
        """The record's adapters, starting from the A that pgbuild gives each document."""

        def __init__(self, bsz, model, rank, **kwargs):
            super().__init__(bsz, model, rank, **kwargs)
            if bsz == len(docs):
                start_as_pgbuild(self, in_batch_order, cfg)

    monkeypatch.setattr(ref, "BatchedTTTLoRA", SameInit)
    counts = SidecarBytes(load_tokens(find_data(str(caseops_data), 1024), "val_bytes", len(tokens)))
    ours = evaluate(pgbuild_model(setup), tokens, counts, cfg, "lora", torch.device("cpu"))
    record = copy.deepcopy(model)
    theirs = ref.eval_val_ttt_phased(h, record, torch.device("cpu"), val, record.forward_ttt)[1]
    plain = evaluate(pgbuild_model(setup), tokens, counts, cfg, "standard", torch.device("cpu")).val_bpb
    assert abs(ours.val_bpb - theirs) <= 1e-6 and abs(ours.val_bpb - plain) > 1e-2


def test_phased_lora_ttt_in_the_records_order_matches_the_record(ref, setup, monkeypatch):
    """eval.lora_order=record against the record's eval_val_ttt_phased with its phases on: 13
    documents (BOS written into the validation prefix), batches of three taken longest first,
    phases after 3 and 6 scored documents, each a global SGD over packed 256-token rows in which
    documents cross the 128-token windows; the last two full batches share their A (the record's
    warm start). Adapters start from the same init in both."""
    h, val, model = setup
    cuts = np.cumsum([0, 300, 90, 500, 200, 60, 700, 150, 410, 1000, 400])
    tokens, sidecar = val.val_tokens.numpy().copy(), val.val_bytes.numpy().copy()
    tokens[cuts], sidecar[cuts] = BOS_ID, 0  # the BOS token of each document spells no byte
    phased = copy.copy(val)
    phased.val_tokens, phased.val_bytes = torch.from_numpy(tokens), torch.from_numpy(sidecar)
    for name, value in dict(ttt_lora_rank=LORA["rank"], ttt_chunk_size=LORA["chunk"], ttt_eval_seq_len=SEQ_LEN,
                            ttt_lora_lr=LORA["lr"], ttt_beta2=0.99, ttt_weight_decay=0.5, ttt_batch_size=3,
                            phased_ttt_prefix_docs=6, phased_ttt_num_phases=2, global_ttt_lr=0.01,
                            global_ttt_chunk_tokens=2 * SEQ_LEN, global_ttt_batch_seqs=2).items():
        monkeypatch.setattr(h, name, value)
    cfg = EvalConfig(seq_len=SEQ_LEN, lora_chunk_tokens=LORA["chunk"], lora_rank=LORA["rank"], lora_lr=LORA["lr"],
                     lora_batch_docs=3, lora_group_rows=3, lora_phase_docs=6, lora_phases=2, lora_phase_lr=0.01,
                     ttt_momentum=0.9, ttt_chunk_tokens=2 * SEQ_LEN, ttt_batch_seqs=2, ttt_grad_clip=1.0,
                     lora_order="record")
    queue = [[i for i, _ in entries] for _, entries in
             ref._build_ttt_global_batches(list(enumerate(ref._find_docs(phased.val_tokens))), h)]
    assert [len(b) for b in queue] == [1, 3, 3, 3, 3]  # the longest document is alone: a short batch first

    assert ref.BatchedLinearLoRA._WARM_START_A  # its default: full batches keep A until a phase
    upcoming = list(queue)

    class SameInit(ref.BatchedTTTLoRA):
        """The record's adapters, starting from the A that pgbuild gives the same batch. The
        record builds new adapters for a short batch, and for its full batches one set at the
        start and after each phase, which each full batch resets (B = 0, A kept); pgbuild seeds
        that set with the first full batch it serves."""

        def __init__(self, bsz, model, rank, **kwargs):
            super().__init__(bsz, model, rank, **kwargs)
            if bsz == h.ttt_batch_size:
                start_as_pgbuild(self, next((b for b in upcoming if len(b) == bsz), upcoming[0]), cfg)
            else:
                start_as_pgbuild(self, upcoming.pop(0), cfg)

        def reset(self):
            super().reset()
            upcoming.pop(0)

    monkeypatch.setattr(ref, "BatchedTTTLoRA", SameInit)
    record = copy.deepcopy(model)
    theirs = ref.eval_val_ttt_phased(h, record, torch.device("cpu"), phased, record.forward_ttt)[1]
    assert not upcoming
    counts = SidecarBytes(sidecar)
    ours = evaluate(pgbuild_model(setup), tokens, counts, cfg, "lora", torch.device("cpu")).val_bpb
    unphased = evaluate(pgbuild_model(setup), tokens, counts, dataclasses.replace(cfg, lora_phases=0), "lora",
                        torch.device("cpu")).val_bpb
    in_stream_order = evaluate(pgbuild_model(setup), tokens, counts,
                               dataclasses.replace(cfg, lora_order="stream"), "lora", torch.device("cpu")).val_bpb
    assert abs(ours - theirs) <= 1e-6
    assert abs(ours - unphased) > 1e-2 and abs(ours - in_stream_order) > 1e-4  # measured 0.018, 0.0008


def test_bench_export_is_the_inverse_of_the_import(setup):
    """bench/r0427_phased.py hands pgbuild weights to the record's code through to_r0427."""
    from r0427_phased import to_r0427

    state = pgbuild_model(setup).state_dict()
    back = from_r0427(to_r0427(state, MODEL), MODEL)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_from_r0427_rejects_what_is_not_the_record(setup):
    state = setup[2].state_dict()
    with pytest.raises(PgError, match="qo_bank"):
        from_r0427({**state, "qo_bank": state["qo_bank"][:-1]}, MODEL)
    with pytest.raises(PgError, match="smear.gate_w"):
        from_r0427({k: v for k, v in state.items() if k != "smear_gate.weight"}, MODEL)
    with pytest.raises(PgError, match="bigram.weight"):
        from_r0427({**state, "bigram.weight": torch.zeros(3)}, MODEL)
    with pytest.raises(PgError, match="parallel_lanes=2"):
        from_r0427(state, ModelConfig(**{**MODEL.to_dict(), "parallel_lanes": 1}))


# --- the CLI: a record checkpoint -> pgbuild import -> eval --------------------------------------

def import_settings():
    """--set flags giving the r0427 preset the reduced shapes and CPU-sized evaluation."""
    values = dict(vocab_size=1024, num_layers=5, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8,
                  loop_start=1, loop_end=2, parallel_residual_start=3, xsa_last_n=5)
    flags = [f"model.{k}={v}" for k, v in values.items()] + [f"eval.seq_len={SEQ_LEN}", "eval.batch_seqs=4"]
    return [arg for flag in flags for arg in ("--set", flag)]


def test_imported_record_evaluates_like_the_record(ref, setup, caseops_data, tmp_path):
    h, val, model = setup
    record_checkpoint = tmp_path / "final_model.pt"
    state = model.state_dict()
    torch.save({**state, "tok_emb.weight": state["tok_emb.weight"].bfloat16()}, record_checkpoint)
    ckpt = tmp_path / "imported.pt"
    run_pgbuild("import", record_checkpoint, "--format", "r0427", "--out", ckpt, *import_settings())
    proc = run_pgbuild("eval", "--checkpoint", ckpt, "--data", caseops_data,
                       "--max-val-tokens", VAL_SEQS * SEQ_LEN + 1, "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == VAL_SEQS * SEQ_LEN and result["bytes"] == int(val.val_bytes[1:].sum())
    # The record's checkpoint holds a bf16 embedding; so does the one evaluated here.
    model = ref.GPT(h).float()
    model.load_state_dict({**state, "tok_emb.weight": state["tok_emb.weight"].bfloat16().float()})
    model.looping_active = True
    assert abs(result["val_bpb"] - ref.eval_val(h, torch.device("cpu"), val, model)[1]) <= 1e-5


def test_import_refuses_a_record_of_another_shape(setup, tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({k: v for k, v in setup[2].state_dict().items() if k != "kv_bank"}, bad)
    result = CliRunner().invoke(main, ["import", str(bad), "--format", "r0427", "--out", str(tmp_path / "out.pt"),
                                       *import_settings()])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing tensor" in lines[0]
    assert list(tmp_path.iterdir()) == [bad]
