"""pgbuild artifact bootstrap: verify every member of this archive, then run the bundled runtime.

This file becomes the archive's `__main__.py`; pgbuild fills in MANIFEST_SHA256 when it packs.
Nothing from the archive is executed before every member has matched its SHA-256.
"""
import sys

# CPython put this archive first on sys.path to run it. Take it off before importing anything, so
# that no member (a planted `hashlib.py`, say) can stand in for a module imported below. `sys`
# is built in: importing it never searches the path.
sys.path[:] = [entry for entry in sys.path if entry != getattr(__loader__, "archive", None)]

import hashlib
import importlib.abc
import importlib.util
import json
import linecache
import lzma
import zipfile
import zlib

MANIFEST_SHA256 = "@MANIFEST_SHA256@"
ARCHIVE = sys.argv[0]


def fail(message):
    """The one refusal format of every pgbuild command: one `error:` line, exit status 2."""
    print(f"error: {ARCHIVE}: {message}", file=sys.stderr)
    sys.exit(2)


class BundledSources(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports the `runtime` and `builder` packages from the source texts shipped in the archive."""

    def __init__(self, sources):
        self.sources = sources

    def find_spec(self, name, path=None, target=None):
        if name in self.sources:
            package = any(other.startswith(name + ".") for other in self.sources)
            return importlib.util.spec_from_loader(name, self, is_package=package)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        name, source = f"<{ARCHIVE}:{module.__name__}>", self.sources[module.__name__]
        # inspect.getsource reads linecache: Triton's kernels compile from their source text, and
        # tracebacks show the lines.
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        exec(compile(source, name, "exec"), module.__dict__)


def main():
    try:
        archive = zipfile.ZipFile(ARCHIVE)
        archive.read("__main__.py")  # its CRC-32: a damaged copy of this very file that still compiled
        manifest_bytes = archive.read("manifest.json")
        if hashlib.sha256(manifest_bytes).hexdigest() != MANIFEST_SHA256:
            fail("manifest checksum mismatch; the artifact was modified or is corrupt")
        manifest = json.loads(manifest_bytes)
        members = {name: archive.read(name) for name in manifest["members"]}
        unexpected = set(archive.namelist()) - set(members) - {"__main__.py", "manifest.json"}
    except (OSError, zipfile.BadZipFile, zlib.error, KeyError, ValueError, EOFError) as e:
        fail(f"unreadable artifact ({e}); it is corrupt or truncated: rebuild or re-download it")
    if unexpected:
        fail(f"unexpected members {sorted(unexpected)}; the artifact was modified")
    for name, data in members.items():
        if hashlib.sha256(data).hexdigest() != manifest["members"][name]:
            fail(f"member {name} fails its checksum; the artifact was modified or is corrupt")
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    sources = {}
    for code in ("runtime.xz", "training.xz"):
        if code in members:
            sources.update(json.loads(lzma.decompress(members[code], format=lzma.FORMAT_RAW, filters=filters)))
    sys.meta_path.insert(0, BundledSources(sources))
    # A file with no weights (the train_gpt.py of `pgbuild record`) trains when run without arguments.
    argv = sys.argv[1:] or manifest.get("default_argv", [])
    if argv[:1] == ["train"]:
        from builder.standalone import main as train
        sys.exit(train(argv[1:], ARCHIVE))
    from runtime.cli import main as run_cli
    sys.exit(run_cli(argv, manifest, members.__getitem__))


def damaged():
    """Whether this file's own bytes fail their CRC-32: an exception is then damage, not a bug."""
    try:
        zipfile.ZipFile(ARCHIVE).read("__main__.py")
    except Exception:
        return True
    return False


try:
    main()
except Exception as e:
    if not damaged():
        raise
    print(f"error: {sys.argv[0]}: its bootstrap is corrupt ({type(e).__name__}); rebuild or re-download it",
          file=sys.stderr)
    sys.exit(2)
