"""model.record_precision: the 2026-04-09 record's dtypes (bf16 embedding table, residual stream and
rotary tables), kept through the runtime's loading, and only bf16 rounding away from fp32."""

import dataclasses

import torch

from builder.presets import get_preset
from runtime.model import GPT, Rotary


def tiny_pair():
    cfg = get_preset("tiny").model
    torch.manual_seed(0)
    fp32 = GPT(cfg)
    fp32.reset_parameters()
    for p in fp32.parameters():  # zero-initialized projections would hide the stream's dtype
        p.data.add_(torch.randn_like(p) * 0.05)
    record = GPT(dataclasses.replace(cfg, record_precision=True))
    record.load_state_dict(fp32.state_dict())
    # As runtime.api.load_model leaves it: the whole model cast to fp32, then the record's dtypes.
    return fp32.eval(), record.to(dtype=torch.float32).apply_precision().eval()


def test_record_precision_keeps_the_records_bf16_tensors_and_stream():
    fp32, record = tiny_pair()
    assert record.tok_emb.weight.dtype == torch.bfloat16
    assert all(m.inv_freq.dtype == torch.bfloat16 for m in record.modules() if isinstance(m, Rotary))
    assert record.blocks[0].mlp.fc.weight.dtype == torch.float32 and record.skip_weights.dtype == torch.float32
    stream = []
    record.blocks[0].register_forward_hook(lambda module, inputs, output: stream.append(output.dtype))
    ids = torch.randint(0, fp32.cfg.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nll_record, nll_fp32 = record(ids[:, :-1], ids[:, 1:]), fp32(ids[:, :-1], ids[:, 1:])
    assert stream and set(stream) == {torch.bfloat16}
    assert nll_record.dtype == torch.float32
    gap = float((nll_record - nll_fp32).abs().max())
    assert 0 < gap < 0.1  # bf16 rounding, not a different model
