"""`pgbuild audit` on real artifacts: the byte accounting is exact, the weight figures are
consistent with the streams they describe, broken files fail with one line, and the artifact is
only ever read, never executed.

The `artifact` fixture (conftest) is a model trained and packed by the CLI; `small_artifact` is a
second, different artifact packed directly by `builder.artifact.pack` from synthetic int5/int6/int8/fp16
tensors, so comparisons have two distinct files and the intB streams are exercised; `mixed_artifact`
gives the same matrix different widths in different layers, as the `best` recipe's allocator does."""

import builtins
import hashlib
import json
import os
import runpy
import subprocess
import sys
import zipfile
import zipimport

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import run_pgbuild

from builder.artifact.audit import (
    GROUPS,
    ROLES,
    Ref,
    audit_report,
    bits_grid,
    entropy_bytes,
    split_proportionally,
    tensor_group,
)
from builder.artifact.pack import PREAMBLE, ZIP_EPOCH, StreamCompressor, build_artifact
from builder.artifact.sources import installed_code
from builder.commands.audit import audit
from builder.quant.primitives import Encoded
from runtime.artifact import BOOTSTRAP, MANIFEST

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- helpers

def _int_tensor(rng, name, shape, bits):
    """Laplacian-shaped codes in the intB range with fp16 row scales, like GPTQ output."""
    top = 2 ** (bits - 1) - 1
    codes = np.clip(np.round(rng.laplace(0, top / 4, size=shape)), -top, top).astype(np.int8)
    scales = (rng.random(shape[0]) * 0.01 + 0.001).astype(np.float16)
    return Encoded(name, f"int{bits}", shape, codes, scales)


def _fp16_tensor(rng, name, shape):
    return Encoded(name, "fp16", shape, rng.normal(size=shape).astype(np.float16))


@pytest.fixture(scope="session")
def small_tensors():
    rng = np.random.default_rng(0)
    tensors = [_int_tensor(rng, "tok_emb.weight", (256, 64), 8), _fp16_tensor(rng, "skip_weights", (1, 64))]
    for layer in range(2):
        p = f"blocks.{layer}."
        tensors += [_int_tensor(rng, p + "attn.q.weight", (64, 64), 6),
                    _int_tensor(rng, p + "attn.k.weight", (32, 64), 6),
                    _int_tensor(rng, p + "attn.v.weight", (32, 64), 6),
                    _int_tensor(rng, p + "attn.out.weight", (64, 64), 6),
                    _int_tensor(rng, p + "mlp.fc.weight", (256, 64), 5),
                    _int_tensor(rng, p + "mlp.proj.weight", (64, 256), 5),
                    _fp16_tensor(rng, p + "attn_scale", (64,)), _fp16_tensor(rng, p + "attn.q_gain", (4,))]
    return tensors


@pytest.fixture(scope="session")
def small_artifact(tmp_path_factory, small_tensors):
    info = {"model": {"num_layers": 2, "model_dim": 64, "vocab_size": 256, "num_heads": 4, "num_kv_heads": 2},
            "eval": {}, "tokenizer_sha256": "0" * 64, "recipe": {"method": "synthetic", "codecs": ["brotli", "lzma"]},
            "provenance": {"seed": 0}, "metrics": {"standard_bpb": 3.25, "ttt_bpb": 3.0}}
    path = tmp_path_factory.mktemp("small") / "small.py"
    path.write_bytes(build_artifact(small_tensors, info, StreamCompressor(["brotli", "lzma"]), installed_code()))
    return path


@pytest.fixture(scope="session")
def mixed_artifact(tmp_path_factory):
    rng = np.random.default_rng(1)
    tensors = [_int_tensor(rng, "tok_emb.weight", (256, 64), 8), _fp16_tensor(rng, "skip_weights", (1, 64))]
    for layer, (q_bits, fc_bits) in enumerate([(3, 8), (8, 3)]):
        tensors += [_int_tensor(rng, f"blocks.{layer}.attn.q.weight", (64, 64), q_bits),
                    _int_tensor(rng, f"blocks.{layer}.mlp.fc.weight", (256, 64), fc_bits),
                    _fp16_tensor(rng, f"blocks.{layer}.attn_scale", (64,))]
    info = {"model": {"num_layers": 2}, "eval": {}, "tokenizer_sha256": "0" * 64, "provenance": {},
            "recipe": {"method": "synthetic", "codecs": ["brotli"]}}
    path = tmp_path_factory.mktemp("mixed") / "mixed.py"
    path.write_bytes(build_artifact(tensors, info, StreamCompressor(["brotli"]), installed_code()))
    return path


def audit_json(path, *extra):
    result = CliRunner().invoke(audit, [str(path), "--json", *map(str, extra)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_line_error(path, *extra):
    proc = run_pgbuild("audit", path, *extra, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    return lines[0]


def member_data_offset(path, name):
    """Where a member's stored bytes begin, from its local header (what the audit reads too)."""
    blob = path.read_bytes()
    info = zipfile.ZipFile(path).getinfo(name)
    start = info.header_offset
    return start + 30 + int.from_bytes(blob[start + 26:start + 28], "little") + \
        int.from_bytes(blob[start + 28:start + 30], "little")


def rezip(src, dst, replace):
    """A copy of artifact `src` with some members' bytes replaced, repacked the way pack.py packs."""
    with zipfile.ZipFile(src) as zin:
        members = [(i.filename, i.compress_type, replace.get(i.filename, zin.read(i.filename))) for i in zin.infolist()]
    with open(dst, "wb") as f:
        f.write(PREAMBLE)
        with zipfile.ZipFile(f, "w") as zout:
            for name, method, data in members:
                zout.writestr(zipfile.ZipInfo(name, ZIP_EPOCH), data, compress_type=method)


# ----------------------------------------------------------------------------- byte accounting

@pytest.mark.parametrize("which", ["artifact", "small_artifact"])
def test_sections_sum_exactly_to_the_file_size(which, request):
    path = request.getfixturevalue(which)
    report = audit_json(path)
    size = len(path.read_bytes())
    # Each role's bytes from zipfile's own view of the archive: members' stored sizes by name, and
    # everything else (preamble, local headers, directory) is the container.
    with zipfile.ZipFile(path) as zf:
        stored = {i.filename: i.compress_size for i in zf.infolist()}
    weights = sum(n for name, n in stored.items() if name.startswith("w/"))
    code = stored[BOOTSTRAP] + stored["runtime.xz"] + stored["training.xz"]
    expected = {"container": size - sum(stored.values()), "code": code, "manifest": stored[MANIFEST],
                "weights": weights}
    assert report["total_bytes"] == size
    assert report["by_role"] == expected and all(v > 0 for v in expected.values())
    for role, role_bytes in expected.items():
        assert sum(s["bytes"] for s in report["sections"] if s["role"] == role) == role_bytes, role
    assert report["headroom"] == 16_000_000 - size and report["budget_bytes"] == 16_000_000


def test_sections_match_the_zip_layout(artifact):
    report = audit_json(artifact)
    sections = {s["name"]: s for s in report["sections"]}
    with zipfile.ZipFile(artifact) as zf:
        infos = zf.infolist()
        assert set(sections) >= {i.filename for i in infos}
        for info in infos:
            assert sections[info.filename]["bytes"] == info.compress_size
        cd_start = zf.start_dir
    assert sections["preamble"]["bytes"] == len(PREAMBLE) == min(i.header_offset for i in infos)
    assert sections["central directory + end record"]["bytes"] == os.path.getsize(artifact) - cd_start
    assert sections["zip local headers"]["members"] == len(infos)
    roles = {name: s["role"] for name, s in sections.items()}
    assert roles[BOOTSTRAP] == roles["runtime.xz"] == roles["training.xz"] == "code" and roles[MANIFEST] == "manifest"
    assert all(role == "weights" for name, role in roles.items() if name.startswith("w/"))
    assert roles["preamble"] == roles["zip local headers"] == roles["central directory + end record"] == "container"


@pytest.mark.parametrize("which", ["artifact", "small_artifact"])
def test_weight_sections_describe_their_streams(which, request):
    path = request.getfixturevalue(which)
    report = audit_json(path)
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read(MANIFEST))
    weights = [s for s in report["sections"] if s["role"] == "weights"]
    assert {s["name"] for s in weights} == {s["member"] for s in manifest["streams"]}
    streams = {s["member"]: s for s in manifest["streams"]}
    for s in weights:
        stream = streams[s["name"]]
        assert s["stream"] == stream["name"] and s["codec"] == stream["codec"] and s["raw_bytes"] == stream["raw_bytes"]
        assert s["tensors"] >= 1 and s["params"] >= 1
        assert s["bits_per_param"] == pytest.approx(s["bytes"] * 8 / s["params"])
        encoding = s["stream"].rsplit(".", 1)[1]  # intB, fp16, or u16 for the row orders
        symbol_bytes = 2 if encoding in ("fp16", "u16") else 1
        assert s["params"] * symbol_bytes == s["raw_bytes"]
        assert s["bits"] == (16 if symbol_bytes == 2 else int(encoding[3:]))
        # Order-0 entropy: positive, at most the nominal bits per symbol, and near what the codec reached.
        assert 0 < s["entropy_bytes"] <= s["params"] * s["bits"] / 8 + 1e-6
        if s["raw_bytes"] >= 1000:
            assert 0.25 < s["bytes"] / s["entropy_bytes"] < 4, s
    if which == "small_artifact":
        assert {s["bits"] for s in weights} == {5, 6, 8, 16}


def _order0_bytes(symbols):
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum()) * symbols.size / 8


def test_entropy_matches_the_packed_tensors(small_artifact, small_tensors):
    """Entropy measured from the file equals entropy computed from the tensors that went in, for
    the int code streams and for the (byte-shuffled on disk) fp16 value and scale streams."""
    sections = {s["stream"]: s for s in audit_json(small_artifact)["sections"] if "stream" in s}
    fp16 = np.concatenate([t.data.view(np.uint16).ravel() for t in small_tensors if t.enc == "fp16"])
    scales = np.concatenate([t.scales.view(np.uint16) for t in small_tensors if t.scales is not None])
    assert sections["control.fp16"]["entropy_bytes"] == pytest.approx(_order0_bytes(fp16), abs=0.1)
    assert sections["scales.fp16"]["entropy_bytes"] == pytest.approx(_order0_bytes(scales), abs=0.1)
    mlp = np.concatenate([t.data.ravel() for t in small_tensors if ".mlp." in t.name])
    assert sections["mlp_fc.int5"]["entropy_bytes"] + sections["mlp_proj.int5"]["entropy_bytes"] > 0
    fc = np.concatenate([t.data.ravel() for t in small_tensors if t.name.endswith("mlp.fc.weight")])
    assert sections["mlp_fc.int5"]["entropy_bytes"] == pytest.approx(_order0_bytes(fc), abs=0.1)
    assert mlp.size == sections["mlp_fc.int5"]["params"] + sections["mlp_proj.int5"]["params"]


@pytest.mark.parametrize("which", ["artifact", "small_artifact"])
def test_groups_and_layers_split_the_weight_bytes_exactly(which, request):
    path = request.getfixturevalue(which)
    report = audit_json(path)
    weights = report["by_role"]["weights"]
    assert list(report["by_group"]) == list(GROUPS)
    assert sum(g["bytes"] for g in report["by_group"].values()) == weights
    assert sum(layer["bytes"] for layer in report["by_layer"].values()) == weights
    assert "proportional" in report["by_group_split"]
    with zipfile.ZipFile(path) as zf:
        tensors = json.loads(zf.read(MANIFEST))["tensors"]
    assert sum(g["tensors"] for g in report["by_group"].values()) == len(tensors)
    assert sum(g["params"] for g in report["by_group"].values()) == sum(int(np.prod(t["shape"])) for t in tensors)
    assert report["by_group"]["embeddings"]["bytes"] > 0 and report["by_group"]["mlp"]["bytes"] > 0
    layers = {k for k in report["by_layer"] if k != "global"}
    with zipfile.ZipFile(path) as zf:
        num_layers = json.loads(zf.read(MANIFEST))["model"]["num_layers"]
    assert layers == {str(i) for i in range(num_layers)}


def test_report_carries_metrics_and_model_summary(artifact):
    report = audit_json(artifact)
    with zipfile.ZipFile(artifact) as zf:
        manifest = json.loads(zf.read(MANIFEST))
    assert report["metrics"] == manifest["metrics"]
    assert any(k.endswith("_bpb") for k in report["metrics"])
    assert report["model"] == manifest["model"] and report["recipe"] == manifest["recipe"]
    assert f"{manifest['model']['num_layers']} layers" in report["summary"]


def test_budget_bytes_sets_headroom_and_over_budget(small_artifact):
    size = os.path.getsize(small_artifact)
    report = audit_json(small_artifact, "--budget-bytes", size - 1)
    assert report["over_budget"] is True and report["headroom"] == -1
    result = CliRunner().invoke(audit, [str(small_artifact), "--budget-bytes", str(size - 1)], env={"COLUMNS": "160"})
    assert result.exit_code == 0 and "OVER BUDGET by 1 bytes" in result.output


def test_rich_report_shows_every_table(artifact):
    result = CliRunner().invoke(audit, [str(artifact)], env={"COLUMNS": "200"}, catch_exceptions=False)
    assert result.exit_code == 0
    for text in ("bytes by role", "weight streams", "weights by tensor group", "weights by layer",
                 "build-time figures", "headroom", "entropy", "proportion"):
        assert text in result.output, text
    assert f"{os.path.getsize(artifact):,}" in result.output


# ----------------------------------------------------------------------------- compare and plot

def test_compare_shows_both_artifacts_with_deltas(artifact, small_artifact):
    report = audit_json(artifact, "--compare", small_artifact)
    other = report["compare"]
    assert other["total_bytes"] == os.path.getsize(small_artifact)
    delta = other["delta"]
    assert delta["total_bytes"] == other["total_bytes"] - report["total_bytes"]
    for role in ROLES:
        assert delta["by_role"][role] == other["by_role"][role] - report["by_role"][role]
    for group in GROUPS:
        assert delta["by_group"][group] == other["by_group"][group]["bytes"] - report["by_group"][group]["bytes"]
    result = CliRunner().invoke(audit, [str(artifact), "--compare", str(small_artifact)], env={"COLUMNS": "200"},
                                catch_exceptions=False)
    assert result.exit_code == 0
    assert "comparison" in result.output and "small.py" in result.output and "group: mlp" in result.output
    assert f"{delta['total_bytes']:,}" in result.output


def test_compare_with_itself_has_zero_deltas(small_artifact):
    delta = audit_json(small_artifact, "--compare", small_artifact)["compare"]["delta"]
    assert delta["total_bytes"] == 0 and not any(delta["by_role"].values()) and not any(delta["by_group"].values())


def test_plot_writes_a_png(artifact, small_artifact, tmp_path):
    out = tmp_path / "bytes.png"
    audit_json(artifact, "--plot", out, "--compare", small_artifact)
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["bytes.png"]  # no temporary left behind


def test_the_heat_map_shows_the_bits_each_tensor_got(mixed_artifact, tmp_path):
    report = audit_json(mixed_artifact, "--plot", tmp_path / "mixed.png")
    assert (tmp_path / "mixed.png").read_bytes().startswith(PNG_SIGNATURE)
    with zipfile.ZipFile(mixed_artifact) as zf:
        manifest = json.loads(zf.read(MANIFEST))
    tensors = report["tensors"]
    assert [(t["name"], t["enc"]) for t in tensors] == [(t["name"], t["enc"]) for t in manifest["tensors"]]
    assert sum(t["bytes"] for t in tensors) == report["by_role"]["weights"]  # every weight byte, once
    rows, columns, bits = bits_grid(tensors)
    assert rows == ["0", "1", "global"] and columns == ["attn_q", "mlp_fc", "control", "tok_emb"]
    cell = {(r, c): b for r, line in zip(rows, bits) for c, b in zip(columns, line)}
    assert cell["global", "attn_q"] is None and cell["0", "tok_emb"] is None
    # The same matrix gets the bits its width bought, layer by layer: int3 codes under 3 bits per
    # parameter, int8 ones several times more (codes and row scales, compressed).
    assert cell["0", "attn_q"] < 3 < 6 < cell["1", "attn_q"] and cell["1", "mlp_fc"] < 3 < 6 < cell["0", "mlp_fc"]
    for t in tensors:
        if t["kind"] != "control":
            assert cell[t["layer"], t["kind"]] == pytest.approx(t["bits_per_param"])
            assert (t["bits_per_param"] < 3) == (t["enc"] == "int3")


def test_plot_into_a_missing_directory_fails_cleanly(small_artifact, tmp_path):
    message = assert_one_line_error(small_artifact, "--plot", tmp_path / "nowhere" / "x.png")
    assert "no such directory" in message


# ----------------------------------------------------------------------------- broken files

def test_flipped_byte_in_a_weight_member_fails(small_artifact, tmp_path):
    bad = tmp_path / "corrupt.py"
    data = bytearray(small_artifact.read_bytes())
    name = next(n for n in zipfile.ZipFile(small_artifact).namelist() if n.startswith("w/"))
    data[member_data_offset(small_artifact, name) + 3] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert "corrupt" in assert_one_line_error(bad)


def test_flipped_byte_in_the_real_artifact_fails(artifact, tmp_path):
    bad = tmp_path / "corrupt.py"
    data = bytearray(artifact.read_bytes())
    data[member_data_offset(artifact, "w/tok_emb.int8.br") + 10] ^= 0x01
    bad.write_bytes(bytes(data))
    assert_one_line_error(bad)


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_artifact_fails(small_artifact, tmp_path, cut):
    bad = tmp_path / "truncated.py"
    data = small_artifact.read_bytes()
    bad.write_bytes(data[:int(len(data) * cut)])
    assert_one_line_error(bad)


def test_empty_missing_and_non_zip_files_fail(tmp_path):
    (tmp_path / "empty.py").write_bytes(b"")
    (tmp_path / "script.py").write_text("print('hello')\n")
    assert "empty" in assert_one_line_error(tmp_path / "empty.py")
    assert assert_one_line_error(tmp_path / "script.py")
    assert "no such file" in assert_one_line_error(tmp_path / "missing.py")
    assert_one_line_error(tmp_path)


def test_tampered_manifest_fails(small_artifact, tmp_path):
    with zipfile.ZipFile(small_artifact) as zf:
        manifest = json.loads(zf.read(MANIFEST))
    manifest["metrics"]["standard_bpb"] = 0.1  # a flattering lie: the bootstrap's digest no longer matches
    bad = tmp_path / "tampered.py"
    rezip(small_artifact, bad, {MANIFEST: json.dumps(manifest, separators=(",", ":")).encode()})
    assert "checksum" in assert_one_line_error(bad)


# ----------------------------------------------------------------------------- never executed

@pytest.fixture
def booby_trapped(small_artifact, tmp_path):
    """A copy whose bootstrap still carries the right manifest digest (so every checksum passes)
    but, when run, writes a marker file instead of evaluating. Returns (path, marker)."""
    marker = tmp_path / "EXECUTED"
    with zipfile.ZipFile(small_artifact) as zf:
        digest = hashlib.sha256(zf.read(MANIFEST)).hexdigest()
    bootstrap = f'MANIFEST_SHA256 = "{digest}"\nopen({str(marker)!r}, "w").write("AUDIT_BAIT")\n'
    path = tmp_path / "trap.py"
    rezip(small_artifact, path, {BOOTSTRAP: bootstrap.encode()})
    return path, marker


def test_the_trap_is_live_when_run(booby_trapped):
    path, marker = booby_trapped
    subprocess.run([sys.executable, str(path)], capture_output=True, timeout=60)
    assert marker.exists()  # so the next test's absence of a marker means something


def test_audit_reads_but_never_executes_the_artifact(booby_trapped, monkeypatch):
    path, marker = booby_trapped

    def refuse(*args, **kwargs):
        raise AssertionError(f"audit tried to run code: {args!r:.200}")

    real_exec, real_compile = builtins.exec, builtins.compile

    def guarded(real):
        def check(source, *args, **kwargs):
            text = source if isinstance(source, str) else getattr(source, "co_filename", "")
            if isinstance(source, bytes):
                text = source.decode("latin-1")
            if "AUDIT_BAIT" in text or str(path) in text:
                refuse(source)
            return real(source, *args, **kwargs)
        return check

    monkeypatch.setattr(runpy, "run_path", refuse)
    monkeypatch.setattr(runpy, "run_module", refuse)
    monkeypatch.setattr(zipimport, "zipimporter", refuse)
    monkeypatch.setattr(builtins, "exec", guarded(real_exec))
    monkeypatch.setattr(builtins, "compile", guarded(real_compile))
    path_before, modules_before = list(sys.path), set(sys.modules)
    report = audit_report(str(path))
    assert report["total_bytes"] == os.path.getsize(path)
    assert not marker.exists()
    assert sys.path == path_before
    assert not any(getattr(sys.modules[m], "__file__", None) == str(path) for m in set(sys.modules) - modules_before)


def test_audit_command_on_the_trap_writes_no_marker(booby_trapped):
    path, marker = booby_trapped
    proc = run_pgbuild("audit", path, "--json")
    assert json.loads(proc.stdout)["total_bytes"] == os.path.getsize(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- pieces

def test_split_proportionally_is_exact():
    for total, weights in ((10, [1, 1, 1]), (7, [5, 0, 2]), (1_000_003, [3, 7, 11, 13]), (0, [1, 2]), (5, [0, 0])):
        shares = split_proportionally(total, weights)
        assert sum(shares) == total and all(s >= 0 for s in shares)
        if sum(weights):
            assert all(abs(s - total * w / sum(weights)) < 1 for s, w in zip(shares, weights))


def test_entropy_counts_int_codes_as_bytes_and_fp16_as_words():
    codes = np.array([0, 1, 2, 3] * 256, dtype=np.int8).tobytes()  # 2 bits per byte symbol
    assert entropy_bytes(codes, [Ref(0, 0, 0, len(codes), 1, 8)]) == pytest.approx(len(codes) * 2 / 8)
    # Two fp16 words (0x3C00, 0xC100) equally often: 1 bit per 16-bit symbol; a byte view would say 3.
    words = np.array([1.0, -2.5] * 512, dtype=np.float16).tobytes()
    assert entropy_bytes(words, [Ref(0, 0, 0, len(words), 2, 16)]) == pytest.approx(1024 / 8)
    assert entropy_bytes(b"\x07" * 100, [Ref(0, 0, 0, 100, 1, 8)]) == 0


def test_tensor_groups():
    assert tensor_group("tok_emb.weight") == tensor_group("lm_head.weight") == "embeddings"
    assert tensor_group("blocks.3.attn.k.weight") == "attention"
    assert tensor_group("blocks.0.mlp.proj.weight") == "mlp"
    assert (tensor_group("blocks.0.resid_mix") == tensor_group("skip_gates") == tensor_group("blocks.1.attn.q_gain")
            == "control")


# ----------------------------------------------------------------------------- integrity and origin

def test_a_fresh_artifact_is_canonical_and_matches_its_submission(artifact, tmp_path):
    path = tmp_path / "artifact.py"
    path.write_bytes(artifact.read_bytes())
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "submission.json").write_text(json.dumps({"artifact_sha256": sha}))
    report = audit_json(path)
    assert report["code"]["canonical"] == {"preamble": True, BOOTSTRAP: True, "runtime.xz": True, "training.xz": True}
    assert report["sha256"] == sha and report["submission"]["matches"] is True
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"artifact_sha256": "0" * 64}))
    assert audit_json(path, "--submission", other)["submission"]["matches"] is False
    shown = CliRunner().invoke(audit, [str(path), "--submission", str(other)]).output
    assert "canonical" in shown and sha in shown and "DIFFERS" in shown


def test_a_whole_rewrite_passes_the_checksums_but_is_not_canonical(small_artifact, tmp_path):
    """A new runtime with every hash recomputed: the file vouches for itself, the audit does not."""
    import lzma

    from builder.artifact.sources import bootstrap_source, runtime_sources
    from runtime.codec import LZMA_FILTERS

    sources = dict(runtime_sources(), **{"runtime.extra": "print('not pgbuild code')"})
    runtime = lzma.compress(json.dumps(sources).encode(), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    with zipfile.ZipFile(small_artifact) as zf:
        manifest = json.loads(zf.read(MANIFEST))
    manifest["members"]["runtime.xz"] = hashlib.sha256(runtime).hexdigest()
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    rewritten = tmp_path / "rewritten.py"
    rezip(small_artifact, rewritten, {"runtime.xz": runtime, MANIFEST: manifest_bytes,
                                      BOOTSTRAP: bootstrap_source(hashlib.sha256(manifest_bytes).hexdigest())})
    assert audit_json(rewritten)["code"]["canonical"] == {"preamble": True, BOOTSTRAP: True, "runtime.xz": False,
                                                          "training.xz": True}


def test_a_replaced_bootstrap_is_not_canonical(booby_trapped):
    path, marker = booby_trapped
    assert audit_json(path)["code"]["canonical"][BOOTSTRAP] is False and not marker.exists()


def test_a_flipped_byte_in_the_preamble_is_not_canonical(small_artifact, tmp_path):
    raw = bytearray(small_artifact.read_bytes())
    raw[PREAMBLE.index(b"Parameter Golf")] ^= 1
    path = tmp_path / "flipped.py"
    path.write_bytes(bytes(raw))
    assert audit_json(path)["code"]["canonical"]["preamble"] is False


def test_a_planted_pyc_is_refused_statically_and_never_run_by_the_audit(small_artifact, tmp_path):
    """CPython's zipimport prefers `__main__.pyc` to `__main__.py`, so when the file is run the
    planted code runs before any of pgbuild's (a rewrite no file can defend itself against);
    the audit, which never runs it, refuses it as a member the manifest does not list."""
    import importlib.util
    import marshal

    marker = tmp_path / "EXECUTED"
    code = compile(f"open({str(marker)!r}, 'w').write('pyc')", "__main__.py", "exec")
    pyc = importlib.util.MAGIC_NUMBER + (1).to_bytes(4, "little") + bytes(8) + marshal.dumps(code)  # unchecked hash
    path = tmp_path / "planted.py"
    raw = small_artifact.read_bytes()
    with open(path, "wb") as f:
        f.write(raw)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("__main__.pyc", pyc)
    assert "__main__.pyc" in assert_one_line_error(path)
    assert not marker.exists()
    subprocess.run([sys.executable, str(path)], capture_output=True, timeout=60)
    assert marker.exists()  # the residual risk the README states; the audit above is the defence
