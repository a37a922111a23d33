"""The packed bytes of a fixed checkpoint are pinned, so a refactor that moves code around cannot
change what gets shipped without this test saying so.

A seeded synthetic checkpoint (no training: its bytes depend on nothing but the seed) is packed by
`pgbuild quantize` with the `r0409` and `best` recipes. What is pinned is everything in the file
that the model's numbers decide: every weight member's bytes and the manifest's stream and tensor
tables. The runtime member and the provenance are not pinned: they change whenever the runtime's
source or the date does, by design.

Float rounding of the Hessians and of GPTQ depends on torch's version and on the CPU's vector
unit, so the pinned digests hold for the torch build and CPU capability recorded beside them; on
any other the test skips and says which it found. Regenerate after an intended change with
`python -m pytest tests/test_golden_pack.py --update-golden` and say why in the commit.
"""

import hashlib
import json
import zipfile

import pytest
import torch
from conftest import ROOT, run_pgbuild

GOLDEN = ROOT / "tests" / "fixtures" / "golden_pack.json"
RECIPES = ("r0409", "best")


def machine():
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def synthetic_checkpoint(path):
    """The tiny preset's model with seeded N(0, 0.05) weights, in `pgbuild train`'s format."""
    from builder.presets import get_preset
    from runtime.model import GPT

    preset = get_preset("tiny")
    torch.manual_seed(0)
    state = {name: torch.randn(t.shape, dtype=torch.float32) * 0.05
             for name, t in GPT(preset.model).state_dict().items()}
    torch.save({"preset": preset.to_dict(), "state": state, "provenance": {"seed": 0}}, path)


def pinned_digest(artifact):
    """SHA-256 over the weight members and the manifest's stream and tensor tables."""
    with zipfile.ZipFile(artifact) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        h = hashlib.sha256(json.dumps([manifest["streams"], manifest["tensors"]], sort_keys=True).encode())
        for name in sorted(n for n in manifest["members"] if n.startswith("w/")):
            h.update(name.encode() + zf.read(name))
    return h.hexdigest()


@pytest.fixture(scope="module")
def digests(tmp_path_factory, demo_data):
    tmp = tmp_path_factory.mktemp("golden")
    synthetic_checkpoint(tmp / "ckpt.pt")
    found = {}
    for recipe in RECIPES:
        out = tmp / f"{recipe}.py"
        run_pgbuild("quantize", "--checkpoint", tmp / "ckpt.pt", "--data", demo_data, "--out", out,
                    "--recipe", recipe, "--eval-modes", "standard", "--eval-tokens", 2000, "--json")
        found[recipe] = pinned_digest(out)
    return found


def test_packed_weights_match_the_pinned_bytes(digests, request):
    if request.config.getoption("update_golden"):
        GOLDEN.write_text(json.dumps({**machine(), "digests": digests}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    here = machine()
    if {k: golden[k] for k in here} != here:
        pytest.skip(f"digests pinned for {golden['torch']} / {golden['cpu_capability']}, "
                    f"this is {here['torch']} / {here['cpu_capability']}")
    assert digests == golden["digests"]
