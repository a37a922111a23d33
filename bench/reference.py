"""The records' own, unmodified code (../shared/reference) loaded as a module, to run beside pgbuild.

The reference scripts are CUDA-only as shipped: they import FlashAttention 3 (r0427 also its
variable-length kernel, and Triton for fused kernels), compile with inductor and call
`torch.cuda.*`. Here, at run time and outside pgbuild's packages, FA3 is replaced by torch's SDPA
(always: neither this machine nor the GPU machine has flash-attn), the variable-length kernel by
one SDPA call per segment on the CPU and by flex_attention on a GPU (pgbuild's document-masked
kernel, which the record's fullgraph compile traces), Triton (when absent) by a module whose `jit`
only returns the function, and, for a CPU run, `torch.compile` by the identity and the few
`torch.cuda` calls that only time, report or order streams by no-ops, so the same code also runs
on the CPU. Where Triton cannot run (a CPU run, or no Triton) r0427's MLPs take their eager path;
its fused cross-entropy is FUSED_CE_ENABLED, the caller's to set. Their configuration is environment
variables read when the `Hyperparameters` class is created, so they are set around the load and
restored afterwards.

Used by bench/race.py (the reference's side of the race) and by the tests (tests/oracle.py).
"""

import contextlib
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime.attention import Documents, flex_document_attention

REFERENCE = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"


def reference_path(name):
    """../shared/reference/{name}_train_gpt.py (it may be absent: callers check)."""
    return REFERENCE / f"{name}_train_gpt.py"


def sdpa_flash_attn_func(q, k, v, causal=True):
    """FA3's flash_attn_func contract on (B, T, H, D) tensors, through SDPA."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal, enable_gqa=True)
    return y.transpose(1, 2)


def sdpa_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                                window_size=(-1, -1)):
    """FA3's flash_attn_varlen_func on (total, H, D) tensors: causal attention within each segment
    [cu[i], cu[i+1]) of the packed stream, one SDPA call per segment (padding segments are empty)."""
    assert causal and tuple(window_size) == (-1, -1) and torch.equal(cu_seqlens_q, cu_seqlens_k)
    bounds = cu_seqlens_q.tolist()
    pieces = [sdpa_flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b])[0]
              for a, b in zip(bounds, bounds[1:]) if b > a]
    return torch.cat(pieces)


def flex_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                                window_size=(-1, -1)):
    """The same contract for compiled GPU code: the segments as one row of pgbuild's Documents,
    attended through flex_attention. The per-segment stand-in reads the boundaries on the host,
    which breaks the record's fullgraph compile; this one stays in the graph. The record passes
    one cu_seqlens for queries and keys; its padding entries (= total) start no segment."""
    total = q.size(0)
    starts = torch.zeros(total + 1, dtype=torch.bool, device=q.device).index_fill_(0, cu_seqlens_q.long(), True)
    return flex_document_attention(q[None], k[None], v[None], Documents(starts[None, :total]))[0]


def _triton_stand_in():
    """`triton`, `triton.language` and `triton.tools.tensor_descriptor` for a machine without
    Triton: enough for the module to load (decorators, annotations); its kernels never run."""
    triton = types.ModuleType("triton")
    triton.jit = lambda fn=None, **_options: (lambda f: f) if fn is None else fn
    language = types.ModuleType("triton.language")
    language.constexpr = object
    tools = types.ModuleType("triton.tools")
    descriptor = types.ModuleType("triton.tools.tensor_descriptor")
    descriptor.TensorDescriptor = object
    triton.language, triton.tools, tools.tensor_descriptor = language, tools, descriptor
    return {"triton": triton, "triton.language": language, "triton.tools": tools,
            "triton.tools.tensor_descriptor": descriptor}


def identity_compile(fn=None, **_options):
    """`torch.compile` as a no-op, both as `@torch.compile` and `torch.compile(f, fullgraph=...)`."""
    return (lambda f: f) if fn is None else fn


class _OneStream:
    """A CUDA stream on the CPU: there is one queue, so waiting on another is a no-op."""

    def wait_stream(self, other):
        pass


class _CudaOnCpu(types.ModuleType):
    """`torch.cuda` for a CPU run: synchronizing is a no-op, memory peaks read 0, streams are
    one queue (the record's optimizer steps on a side stream), anything else is torch.cuda's own."""

    def __init__(self):
        super().__init__("torch.cuda")
        self.synchronize = lambda device=None: None
        self.max_memory_allocated = lambda device=None: 0
        self.max_memory_reserved = lambda device=None: 0
        self.empty_cache = lambda: None
        self.Stream = _OneStream
        self.current_stream = lambda device=None: _OneStream()
        self.stream = lambda stream: contextlib.nullcontext()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _torch_on_cpu():
    """The module's `torch` global for a CPU run: torch itself, but `compile` the identity (the
    reference also calls it inside its training and eval functions), `cuda` as above and `empty`
    without pinned memory (r0427's loader pins its batches for the copy to the GPU)."""
    shim = types.ModuleType("torch")
    shim.__getattr__ = lambda name: getattr(torch, name)
    shim.compile = identity_compile
    shim.cuda = _CudaOnCpu()
    shim.empty = lambda *size, pin_memory=False, **kwargs: torch.empty(*size, **kwargs)
    return shim


@contextlib.contextmanager
def _patched(env, cpu):
    saved_env = {k: os.environ.get(k) for k in env}
    saved_compile = torch.compile
    fa3 = types.ModuleType("flash_attn_interface")
    fa3.flash_attn_func = sdpa_flash_attn_func
    fa3.flash_attn_varlen_func = sdpa_flash_attn_varlen_func if cpu else flex_flash_attn_varlen_func
    stand_ins = {"flash_attn_interface": fa3}
    try:
        import triton  # noqa: F401  (the real one, where installed)
    except ImportError:
        stand_ins.update(_triton_stand_in())
    saved_modules = {name: sys.modules.get(name) for name in stand_ins}
    os.environ.update({k: str(v) for k, v in env.items()})
    if cpu:
        torch.compile = identity_compile  # the module-level @torch.compile runs during the load
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        torch.compile = saved_compile
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# r0409 nests double quotes inside two f-strings, which only Python >= 3.12 parses (PEP 701).
# On older Pythons these two quote swaps, and nothing else, make it compile; behaviour is unchanged.
PRE_PEP701_QUOTES = {"r0409": [('{", ".join(', "{', '.join("),
                               ('glob("fineweb_train_*.bin")', "glob('fineweb_train_*.bin')")]}


def _source(name, path):
    source = path.read_text(encoding="utf-8")
    if sys.version_info < (3, 12):
        for old, new in PRE_PEP701_QUOTES.get(name, []):
            source = source.replace(old, new)
    return source


def load_reference_module(name, env=None, cpu=True, path=None):
    """The reference script `{name}_train_gpt.py` (or the copy of it at `path`) as a fresh
    module, configured by `env`.

    `cpu=True`: eager (torch.compile the identity) and the timing/reporting torch.cuda calls
    no-ops. `cpu=False` (a GPU): the code runs as shipped, compiled, but for FA3 -> SDPA.
    Raises FileNotFoundError when ../shared/reference is not beside the checkout."""
    path = Path(path) if path else reference_path(name)
    if not path.exists():
        raise FileNotFoundError(f"{path} is absent: the reference needs ../shared/reference beside the checkout")
    module = types.ModuleType(f"reference_{name}")
    module.__file__ = str(path)
    code = compile(_source(name, path), str(path), "exec")
    with _patched(env or {}, cpu):
        exec(code, module.__dict__)
    if cpu or "triton" not in sys.modules:
        _eager_mlps(module)
    if cpu:
        module.torch = _torch_on_cpu()
    return module


def _eager_mlps(module):
    """r0427's MLPs train through a Triton kernel, which needs Triton and a GPU: built from here
    on, they take their own eager path (the same math, its forward when not training)."""
    if not hasattr(module, "FusedLeakyReLUSquareMLP"):
        return

    class EagerMLP(module.MLP):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.use_fused = False
    module.MLP = EagerMLP
