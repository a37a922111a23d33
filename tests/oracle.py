"""The records' own, unmodified code (../shared/reference) loaded as modules to compare against.

The loading itself (FA3 -> SDPA, torch.compile -> identity, env-var configuration, the
pre-PEP 701 quote swaps) lives in bench/reference.py, shared with bench/race.py; this module
adds the tests' behaviour: skip, with the reason, when ../shared/reference is absent.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

_BENCH_REFERENCE = Path(__file__).resolve().parent.parent / "bench" / "reference.py"


def _bench_reference():
    """bench/reference.py, loaded once (bench/ is scripts, not a package)."""
    module = sys.modules.get("bench_reference")
    if module is None:
        spec = importlib.util.spec_from_file_location("bench_reference", _BENCH_REFERENCE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_reference"] = module
        spec.loader.exec_module(module)
    return module


_reference = _bench_reference()
REFERENCE = _reference.REFERENCE
PRE_PEP701_QUOTES = _reference.PRE_PEP701_QUOTES
sdpa_flash_attn_func = _reference.sdpa_flash_attn_func
identity_compile = _reference.identity_compile


def load_reference(name, **env):
    """The reference script `{name}_train_gpt.py` as a fresh module, configured by `env`, eager
    on the CPU.

    Skips the calling test (with the reason) when ../shared/reference is not beside the checkout."""
    path = _reference.reference_path(name)
    if not path.exists():
        pytest.skip(f"{path} is absent: the reference tests need ../shared/reference beside the checkout")
    return _reference.load_reference_module(name, env, cpu=True)
