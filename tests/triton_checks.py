"""Running the training's Triton kernels without a GPU, for tests/test_fused_*.py.

Two ways, each in a fresh process:
- through Triton's interpreter (TRITON_INTERPRET=1, read when a kernel is defined), numpy
  standing in for the GPU: the kernels' numbers against the eager code's;
- through Triton's own compiler down to a cubin for sm_90 (an H100), which needs no device: a
  kernel the interpreter would forgive but the GPU's compiler rejects fails here too, and the
  shared memory it asks for is known. Compiled from the module as installed and from the
  minified text an artifact carries (templates/bootstrap.py runs it from linecache).
"""

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

HOPPER_SHARED_MEMORY = 232_448
"""Bytes of shared memory one H100 block may use (227 KiB, the opt-in maximum)."""

# Two places where Triton 3.9's interpreter does bf16 unlike a GPU: tl.dot multiplies bf16 tiles as
# their raw 16-bit patterns (it widens only fp8), and casts from fp32 truncate where a GPU rounds
# to nearest even. Patched to the GPU's arithmetic: widened to the fp32 a bf16 stands for (which
# a GPU's bf16 dot accumulates exactly), rounded to nearest even.
INTERPRETER_AS_GPU = textwrap.dedent("""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    _builder = interpreter.InterpreterBuilder
    _create_dot, _cast_impl = _builder.create_dot, _builder.cast_impl

    def _widened(t):
        if t.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle((t.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return t

    def _create_dot_bf16(self, a, b, d, *args):
        return _create_dot(self, _widened(a), _widened(b), d, *args)

    def _cast_impl_rtne(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = src.data.astype(np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return _cast_impl(self, src, dst_type)

    _builder.create_dot, _builder.cast_impl = _create_dot_bf16, _cast_impl_rtne
""")


def run_interpreted(script):
    """Run `script` with Triton's interpreter; the Python literal on its last output line."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_AS_GPU + textwrap.dedent(script)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


COMPILE_FOR_HOPPER = textwrap.dedent("""
    import importlib, json, linecache, sys, types
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, form, kernels = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if form == "bundled":
        from builder.artifact.sources import training_sources
        source = training_sources()[module_name]
        name = f"<artifact.py:{module_name}>"
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        module = types.ModuleType(module_name)
        exec(compile(source, name, "exec"), module.__dict__)
    else:
        module = importlib.import_module(module_name)

    shared = []
    for kernel in kernels:
        fn = getattr(module, kernel["name"])
        constexprs = kernel["constexprs"]
        signature = {n: "constexpr" if n in constexprs else kernel["signature"][n] for n in fn.arg_names}
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in kernel.get("divisible_by_16", [])}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options=kernel.get("options", {}))
        assert compiled.asm["cubin"]
        shared.append(compiled.metadata.shared)
    print(json.dumps(shared))
""")


def compile_for_hopper(module, form, kernels):
    """Compile each of `module`'s kernels ({name, signature: {arg: Triton type}, constexprs:
    {arg: value}, divisible_by_16: [arg], options}) for sm_90, the module "installed" or
    "bundled" as an artifact carries it; the shared memory bytes each one takes. Triton's JIT
    specializes a launch's arguments the same way: an int equal to 1 becomes a constant, and
    pointers and ints divisible by 16 are marked so."""
    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER, module, form, json.dumps(kernels)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
