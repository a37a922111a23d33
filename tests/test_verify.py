"""builder/judge (pgbuild verify): the artifact's own evaluation passes the legality checks, and deliberately
broken runtimes, packed into otherwise identical artifacts, are caught by the same checks."""

import ast
import hashlib
import io
import json
import lzma
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from conftest import run_pgbuild
from rich.console import Console

from builder.artifact.pack import PREAMBLE, ZIP_EPOCH
from builder.artifact.sources import bootstrap_source
from builder.judge.evaltime import overtime_warning, projected_seconds
from builder.judge.recorder import is_padding
from builder.judge.render import render_verify
from builder.judge.verify import verify_artifact
from runtime.artifact import BOOTSTRAP, MANIFEST, Artifact
from runtime.codec import LZMA_FILTERS
from runtime.files import write_atomic

# Short enough for CPU: 4 sequences of the tiny preset's 128 tokens; TTT chunks of 128 tokens, so
# the TTT run makes three updates, each on positions it has already scored.
SMALL = dict(tokens=513, assignments=["eval.ttt_chunk_tokens=128"])
CLI_SMALL = ["--tokens", 513, "--set", "eval.ttt_chunk_tokens=128"]


def repack(src, dst, patch):
    """`src` with its runtime sources replaced by `patch(sources)`: a valid artifact (checksums and
    bootstrap redone) whose evaluation code differs."""
    art = Artifact(str(src)).verify()
    members = {name: art.read(name) for name in art.manifest["members"]}
    sources = json.loads(lzma.decompress(members["runtime.xz"], format=lzma.FORMAT_RAW, filters=LZMA_FILTERS))
    members["runtime.xz"] = lzma.compress(json.dumps(patch(dict(sources))).encode(), format=lzma.FORMAT_RAW,
                                          filters=LZMA_FILTERS)
    manifest = dict(art.manifest, members={n: hashlib.sha256(d).hexdigest() for n, d in members.items()})
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    out = io.BytesIO()
    out.write(PREAMBLE)
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(zipfile.ZipInfo(BOOTSTRAP, ZIP_EPOCH), bootstrap_source(hashlib.sha256(manifest_bytes).hexdigest()),
                    zipfile.ZIP_DEFLATED)
        zf.writestr(zipfile.ZipInfo(MANIFEST, ZIP_EPOCH), manifest_bytes, zipfile.ZIP_DEFLATED)
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, ZIP_EPOCH), data, zipfile.ZIP_STORED)
    write_atomic(str(dst), out.getvalue())
    return dst


def _code(text):
    return ast.parse(textwrap.dedent(text)).body


def wrap_gpt_forward(wrapper):
    """Rename GPT.forward to _honest_forward and add `wrapper` (a forward calling it)."""
    def patch(sources):
        tree = ast.parse(sources["runtime.model"])
        gpt = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GPT")
        forward = next(n for n in gpt.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
        forward.name = "_honest_forward"
        gpt.body += _code(wrapper)
        sources["runtime.model"] = ast.unparse(ast.fix_missing_locations(tree))
        return sources
    return patch


# The model also sees token t+1 when predicting it: logits at t get a bonus on the next input
# token. Still a normalized softmax, and every NLL before t is untouched by changes after t.
PEEK = wrap_gpt_forward("""
    def forward(self, ids, targets=None):
        logits = self._honest_forward(ids)
        following = torch.cat((ids[:, 1:], ids[:, -1:]), 1)
        logits = logits + 4.0 * F.one_hot(following, logits.size(-1)).to(logits.dtype)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction='none').view_as(targets)
""")

# Scores every token as if it had twice its probability: the scores sum to 2 over the vocabulary.
UNNORMALIZED = wrap_gpt_forward("""
    def forward(self, ids, targets=None):
        out = self._honest_forward(ids, targets)
        return out if targets is None else out - 0.6931471805599453
""")


def rescore(report_second_pass):
    """score_windows runs a second pass that scores every window position (shorter contexts) and
    keeps the minimum of the two NLLs (PR #573's min-over-passes)."""
    def patch(sources):
        tree = ast.parse(sources["runtime.windows"])
        once = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "score_windows")
        once.name = "_score_once"
        tree.body += _code(f"""
            def score_windows(model, tokens, windows, nll, batch_size, device, on_score=None):
                _score_once(model, tokens, windows, nll, batch_size, device, on_score)
                again = nll.clone()
                _score_once(model, tokens, [Window(w.start, w.length, 0) for w in windows], again, batch_size,
                            device, {'on_score' if report_second_pass else 'None'})
                torch.minimum(nll, again, out=nll)
        """)
        sources["runtime.windows"] = ast.unparse(ast.fix_missing_locations(tree))
        return sources
    return patch


def train_before_scoring(sources):
    """Score-first TTT turned around: each chunk is trained on before its windows are scored."""
    tree = ast.parse(sources["runtime.ttt"])
    ttt = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "score_first_ttt")
    loop = [n for n in ttt.body if isinstance(n, ast.For)][-1]
    loop.body[:0] = _code("""
        train_on_positions(model, optimizer, tokens, c * chunk, min((c + 1) * chunk, num_positions), cfg, cfg.ttt_lr,
                           cfg.ttt_epochs, ranks, device, on_train)
    """)
    sources["runtime.ttt"] = ast.unparse(ast.fix_missing_locations(tree))
    return sources


def adapt_before_scoring(sources):
    """LoRA TTT turned around: a chunk's forward trains the adapters, they step, and only then
    does a second forward score the chunk. Reported as the honest code reports (on_train before
    the training forward), so only the order gives it away."""
    tree = ast.parse(sources["runtime.lora_ttt"])
    step = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "chunk_step")
    step.name = "_honest_chunk_step"
    tree.body += _code("""
        def chunk_step(model, adapters, x, y, rows, training, nll, on_score=None, on_train=None):
            _honest_chunk_step(model, adapters, x, y, rows, training, nll.clone(), None, on_train)
            with torch.no_grad():
                for p in adapters.parameters():
                    if p.grad is not None:
                        p -= 1e-3 * p.grad.sign()
                        p.grad = None
            _honest_chunk_step(model, adapters, x, y, rows, [False] * len(rows), nll, on_score, None)
    """)
    sources["runtime.lora_ttt"] = ast.unparse(ast.fix_missing_locations(tree))
    return sources


def failed(report):
    """{mode: [failed check names]}"""
    return {mode: [k for k, c in r["checks"].items() if not c["passed"]] for mode, r in report["modes"].items()}


@pytest.fixture(scope="module")
def honest(artifact, demo_data):
    return verify_artifact(str(artifact), str(demo_data), probes=2, modes=["standard", "sliding"], **SMALL)


def test_cli_verify_passes_the_real_artifact(artifact, demo_data):
    proc = run_pgbuild("verify", artifact, "--data", demo_data, *CLI_SMALL, "--probes", 2, "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["passed"] and report["executes_artifact_code"]
    assert set(report["modes"]) == {"standard", "sliding", "ttt", "lora"}
    # Each mode's verdict is on stderr as it finishes (a killed run keeps the ones before), with the
    # baselines on the same tokens beside the bpb.
    verdicts = [line for line in proc.stderr.splitlines() if line.startswith("verify ")]
    assert [line.split(":")[0] for line in verdicts] == [f"verify {m}" for m in report["modes"]]
    assert all(": PASS " in line and "uniform" in line for line in verdicts)
    for mode in report["modes"].values():
        assert mode["val_bpb"] < mode["unigram_bpb"] < mode["uniform_bpb"]
    assert failed(report) == {m: [] for m in report["modes"]}
    ttt, lora = report["modes"]["ttt"]["checks"], report["modes"]["lora"]["checks"]
    # The evidence is real: updates happened on scored positions only, every position scored once.
    assert ttt["score_first"]["train_rows"] == 3 and ttt["score_first"]["trained_positions"] == 384
    assert ttt["single_pass"]["positions"] == 512 and ttt["single_pass"]["never_scored"] == 0
    # LoRA: 512 positions of one document in chunks of 32, an adapter step after each but the last.
    assert lora["score_first"]["train_rows"] == 15 and lora["score_first"]["trained_positions"] == 480
    assert lora["single_pass"]["positions"] == 512 and lora["single_pass"]["never_scored"] == 0
    # Each mode's plain evaluation is timed and projected to the full validation stream.
    assert report["validation_positions"] > report["positions"] == 512
    for mode in report["modes"].values():
        assert 0 < mode["eval_seconds"] <= mode["projected_eval_seconds"] and mode["time_warning"] is None
    for mode in report["modes"].values():
        causal = mode["checks"]["causal"]
        assert len(causal["cuts"]) == 2 and all(c["mean_dnll_after"] > 0.1 for c in causal["cuts"])
        assert mode["checks"]["normalized"]["max_nll_gap"] < 1e-4
        assert mode["checks"]["normalized"]["positions_checked"] == 512


def test_peeking_at_the_next_token_is_caught(artifact, demo_data, tmp_path, honest):
    path = repack(artifact, tmp_path / "peek.py", PEEK)
    report = verify_artifact(str(path), str(demo_data), probes=1, modes=["standard"], **SMALL)
    assert failed(report) == {"standard": ["causal"]}
    # The leak pays: without the check this artifact would claim a better score than the honest one.
    assert report["modes"]["standard"]["val_bpb"] < honest["modes"]["standard"]["val_bpb"]
    cut = report["modes"]["standard"]["checks"]["causal"]["cuts"][0]
    # Every NLL before t is unchanged; the distribution for token t+1 is not: the probability of
    # the original token t+1 collapses once the token it peeks at is replaced.
    assert cut["max_dnll_before"] == 0 and cut["max_dlogp_through_t"] > 1


def test_an_unnormalized_distribution_is_caught(artifact, demo_data, tmp_path):
    path = repack(artifact, tmp_path / "unnormalized.py", UNNORMALIZED)
    proc = run_pgbuild("verify", path, "--data", demo_data, *CLI_SMALL, "--probes", 1, "--mode", "standard", "--json",
                       check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and failed(report) == {"standard": ["normalized"]}
    assert "verify standard: FAIL (C2 normalized)" in proc.stderr  # the verdict, as soon as the mode ends
    assert report["modes"]["standard"]["checks"]["normalized"]["max_implied_mass"] == pytest.approx(2.0, rel=1e-4)
    console = Console(record=True, width=200)
    render_verify(console, report)
    text = console.export_text()
    assert "C2 normalized" in text and "FAIL" in text and "implied mass ≤ 2" in text and "verification failed" in text


@pytest.mark.parametrize("reported", [True, False], ids=["reported", "silent"])
def test_rescoring_is_caught(artifact, demo_data, tmp_path, honest, reported):
    path = repack(artifact, tmp_path / "rescore.py", rescore(reported))
    report = verify_artifact(str(path), str(demo_data), probes=1, modes=["sliding"], **SMALL)
    assert failed(report) == {"sliding": ["single_pass"]}
    assert report["modes"]["sliding"]["val_bpb"] < honest["modes"]["sliding"]["val_bpb"]
    evidence = report["modes"]["sliding"]["checks"]["single_pass"]
    if reported:
        assert evidence["scored_more_than_once"] > 0
    else:
        assert evidence["unclaimed_rows"] > 0 and evidence["max_returned_vs_forward"] > 0


def test_training_before_scoring_is_caught(artifact, demo_data, tmp_path):
    path = repack(artifact, tmp_path / "train_first.py", train_before_scoring)
    report = verify_artifact(str(path), str(demo_data), probes=1, modes=["ttt"], **SMALL)
    checks = report["modes"]["ttt"]["checks"]
    assert not checks["score_first"]["passed"] and checks["score_first"]["train_violations"] > 0
    assert not checks["causal"]["passed"]  # the update on the perturbed chunk moved its earlier scores
    assert checks["single_pass"]["passed"] and checks["normalized"]["passed"]


def test_adapting_before_scoring_is_caught(artifact, demo_data, tmp_path):
    """The honest LoRA TTT scores a chunk and trains on it in one forward; this one trains in a
    forward, steps, then scores in another: caught although every report looks alike."""
    path = repack(artifact, tmp_path / "adapt_first.py", adapt_before_scoring)
    report = verify_artifact(str(path), str(demo_data), probes=1, modes=["lora"], **SMALL)
    checks = report["modes"]["lora"]["checks"]
    assert not checks["score_first"]["passed"] and checks["score_first"]["train_violations"] > 0
    assert not checks["causal"]["passed"]  # the step on a chunk moved that chunk's own scores
    assert checks["single_pass"]["passed"] and checks["normalized"]["passed"]


def test_the_bundled_runtime_stays_private(honest):
    # verify imported the artifact's runtime under a private name and removed it again; the
    # builder's own runtime is the one still importable as `runtime`.
    import runtime.evaluate
    assert not [m for m in sys.modules if m.startswith("_pgverify")]
    assert sys.modules["runtime.evaluate"] is runtime.evaluate
    assert honest["passed"]


def test_an_artifact_older_than_runtime_api_is_refused_as_older(artifact, demo_data, tmp_path):
    """Packed before pgbuild 0.2.0, an artifact's runtime has no runtime.api: not damaged, older."""
    path = repack(artifact, tmp_path / "older.py", lambda sources: {k: v for k, v in sources.items()
                                                                     if k != "runtime.api"})
    proc = run_pgbuild("verify", path, "--data", demo_data, "--tokens", 600, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "lacks runtime.api" in lines[0]
    assert "pack it again" in lines[0] and lines[0].count("pgbuild 0.") == 1


def test_bad_requests_are_one_line_errors(artifact, demo_data):
    bad = run_pgbuild("verify", artifact, "--data", demo_data, "--set", "eval.nonsense=1", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --set") and "Traceback" not in bad.stderr
    # A chunk the user chose is kept, so one that leaves a single chunk (no update) is refused.
    one_chunk = run_pgbuild("verify", artifact, "--data", demo_data, "--tokens", 300, "--set",
                            "eval.ttt_chunk_tokens=4096", check=False)
    assert one_chunk.returncode == 2 and "one TTT chunk" in one_chunk.stderr


def test_a_compiled_evaluation_is_verified_eagerly(artifact, demo_data):
    """torch.compile would trace the instrumentation wrapped around the forward (the lora mode's
    dynamic shapes fail on it): verify runs the evaluation eagerly and says so."""
    notes = []
    report = verify_artifact(str(artifact), str(demo_data), probes=1, modes=["lora"],
                             tokens=SMALL["tokens"], assignments=["eval.compile=true"], note=notes.append)
    assert report["passed"] and report["eval"]["compile"] is False
    assert notes == ["eval.compile: verified eagerly (an instrumented forward cannot be compiled)"]


def test_a_prefix_shorter_than_a_ttt_chunk_gets_chunks_that_fit(artifact, demo_data):
    proc = run_pgbuild("verify", artifact, "--data", demo_data, "--tokens", 300, "--mode", "ttt", "--probes", 1,
                       "--json")
    report = json.loads(proc.stdout)
    # 300 tokens are two sequences of 128, 256 positions; the tiny preset's chunks are 4,096.
    line = ("ttt: the 256 positions of --tokens 300 fit in one chunk of ttt_chunk_tokens 4,096; verifying with "
            "chunks of 128 (2 chunks)")
    assert line in proc.stderr.splitlines() and report["notes"] == [line]
    assert report["ttt_chunk_tokens"] == report["eval"]["ttt_chunk_tokens"] == 128 and report["passed"]
    score_first = report["modes"]["ttt"]["checks"]["score_first"]
    assert score_first["train_rows"] == 1 and score_first["trained_positions"] == 128  # the update is checked


def test_eval_time_projection_and_warning():
    assert projected_seconds(10.0, 1000) == 10.0  # the full stream's length unknown: as measured
    assert projected_seconds(10.0, 1000, 62_000) == 620.0
    # The first batch's one-off 4 s count once; the other 6 s bought 900 positions, and 9,900 follow it.
    assert projected_seconds(10.0, 1000, 10_000, first=(4.0, 100)) == pytest.approx(4.0 + 6.0 * 9900 / 900)
    assert overtime_warning("ttt", 9.6, 1000, 62_000) is None  # 595 s: within the limit
    assert overtime_warning("ttt", 10.0, 1000, 62_000) == (
        "warning: ttt evaluation would take about 620 s on this machine (10.0 s for 1,000 tokens, scaled to the "
        "full validation stream's 62,000), over the challenge's 600 s limit")
    assert overtime_warning("lora", 700.0, None, where="the machine of run 7") == (
        "warning: lora evaluation would take about 700 s on the machine of run 7 (700.0 s), over the challenge's "
        "600 s limit")


def test_only_rows_of_token_zero_alone_count_as_padding():
    """Padding rows need no report; a row with any stream token in it still does."""
    zeros = np.zeros((2, 4), np.int64)
    assert is_padding(zeros, zeros) and is_padding(zeros, None)
    hidden = zeros.copy()
    hidden[1, 3] = 5
    assert not is_padding(hidden, zeros) and not is_padding(zeros, hidden)
