"""builder/standalone.py and builder/artifact/code.py: an artifact trains a new artifact with its own
code where pgbuild cannot be imported, and its code is what the challenge counts."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import run_artifact

from builder.artifact.code import Code
from builder.artifact.sources import installed_code
from builder.judge.record import training_script
from runtime.artifact import BOOTSTRAP, CODE_MEMBERS, MANIFEST, MANIFEST_DIGEST, Artifact

QUICK = ["--set", "train.iterations=12", "--eval-tokens", 2000, "--eval-modes", "standard"]


def code_bytes(path):
    """{code member: its bytes} of an artifact file, the bootstrap without its manifest digest."""
    with zipfile.ZipFile(path) as zf:
        code = {name: zf.read(name) for name in CODE_MEMBERS}
    code[BOOTSTRAP] = MANIFEST_DIGEST.sub(b"", code[BOOTSTRAP])
    return code


@pytest.fixture(scope="module")
def retrained(artifact, demo_data, clean_env, tmp_path_factory):
    """`python artifact.py train` run where `import builder` fails: (its process, the new file)."""
    cwd = tmp_path_factory.mktemp("retrain")
    proc = run_artifact(artifact, "train", "--data", demo_data, "--out", "new.py", *QUICK, "--json", env=clean_env,
                        cwd=cwd)
    return proc, cwd / "new.py"


def test_an_artifact_trains_a_new_one_without_pgbuild(retrained, artifact, demo_data, clean_env, tmp_path):
    proc, new = retrained
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 12 and summary["bytes"] == os.path.getsize(new) <= 16_000_000
    assert summary["parent_sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert summary["pgbuild_commit"] is None  # an artifact's modules have no file for git to place
    # The same configuration (but the one setting changed) and byte-identical code.
    parent, child = Artifact(str(artifact)).manifest, Artifact(str(new)).verify().manifest
    assert child["train"] == dict(parent["train"], iterations=12) and child["model"] == parent["model"]
    assert child["recipe"] == parent["recipe"] and child["pgbuild"] == parent["pgbuild"]
    assert code_bytes(new) == code_bytes(artifact)
    scored = run_artifact(new, "eval", "--data", demo_data, "--mode", "standard", "--max-val-tokens", 2000, "--json",
                          env=clean_env, cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["val_bpb"] == pytest.approx(summary["standard_bpb"], abs=1e-5)


def test_the_code_members_are_this_pgbuilds_and_come_back_from_a_file(artifact):
    art = Artifact(str(artifact)).verify()
    code, ours = Code.of_artifact(art), installed_code()
    assert code == ours
    assert code.bootstrap(hashlib.sha256(art.zip.read(MANIFEST)).hexdigest()) == art.zip.read(BOOTSTRAP)


def test_bad_input_to_train_is_one_error_line(artifact, demo_data, clean_env, tmp_path):
    for args, says in ((["--data", demo_data, "--set", "train.bogus=1"], "bogus"),
                       (["--data", tmp_path / "missing"], "missing"),
                       (["--data", demo_data, "--eval-modes", "fast"], "fast"),
                       (["--data", demo_data, "--frobnicate"], "frobnicate")):
        proc = run_artifact(artifact, "train", *args, env=clean_env, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], args
    assert os.listdir(tmp_path) == []  # nothing written


def test_the_training_script_is_the_code_alone_and_trains(artifact, demo_data, clean_env, tmp_path):
    art = Artifact(str(artifact)).verify()
    script = tmp_path / "train_gpt.py"
    script.write_bytes(training_script(art))
    assert code_bytes(script) == code_bytes(artifact)
    with zipfile.ZipFile(script) as zf:
        assert sorted(zf.namelist()) == sorted([*CODE_MEMBERS, MANIFEST])
    work = tmp_path / "work"
    work.mkdir()
    # Run as the records run it, without arguments: it trains from ./data (missing here: refused).
    bare = run_artifact(script, env=clean_env, cwd=work)
    assert bare.returncode == 2 and bare.stderr.startswith("error:") and "data" in bare.stderr
    refused = run_artifact(script, "eval", "--data", demo_data, env=clean_env, cwd=work)
    assert refused.returncode == 2 and "no weights" in refused.stderr
    os.symlink(demo_data, work / "data")
    trained = run_artifact(script, "train", "--set", "train.iterations=3", "--eval-tokens", 2000, "--eval-modes",
                           "standard", env=clean_env, cwd=work)
    assert trained.returncode == 0, trained.stderr
    assert code_bytes(work / "artifact.py") == code_bytes(artifact)



def test_an_artifact_trains_under_torchrun(artifact, demo_data, clean_env, tmp_path):
    """Two ranks: the data parallel loop, the Hessians and the GPTQ shares split over both."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(artifact), "train", "--data", str(demo_data), "--out", "two.py", "--set",
                           "train.iterations=4", "--eval-tokens", "2000", "--eval-modes", "standard", "--json"],
                          cwd=tmp_path, env={**clean_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # printed once, by rank 0
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert code_bytes(tmp_path / "two.py") == code_bytes(artifact)
    scored = run_artifact(tmp_path / "two.py", "eval", "--data", demo_data, "--mode", "standard", "--max-val-tokens",
                          2000, "--json", env=clean_env, cwd=tmp_path)
    assert scored.returncode == 0 and json.loads(scored.stdout)["val_bpb"] == pytest.approx(summary["standard_bpb"],
                                                                                            abs=1e-5)
