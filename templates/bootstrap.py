"""pgbuild artifact bootstrap: verify every member of this archive, then run the bundled runtime.

This file becomes the archive's `__main__.py`; pgbuild fills in MANIFEST_SHA256 when it packs.
Nothing from the archive is executed before every member has matched its SHA-256.
"""
import hashlib
import importlib.abc
import importlib.util
import json
import lzma
import sys
import zipfile

MANIFEST_SHA256 = "@MANIFEST_SHA256@"
ARCHIVE = sys.argv[0]


def fail(message):
    sys.exit(f"{ARCHIVE}: {message}")


class BundledSources(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports the `runtime` package from the source texts shipped in the archive."""

    def __init__(self, sources):
        self.sources = sources

    def find_spec(self, name, path=None, target=None):
        if name in self.sources:
            return importlib.util.spec_from_loader(name, self, is_package=name == "runtime")

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        exec(compile(self.sources[module.__name__], f"<{ARCHIVE}:{module.__name__}>", "exec"), module.__dict__)


def main():
    try:
        archive = zipfile.ZipFile(ARCHIVE)
        manifest_bytes = archive.read("manifest.json")
        if hashlib.sha256(manifest_bytes).hexdigest() != MANIFEST_SHA256:
            fail("manifest checksum mismatch; the artifact was modified or is corrupt")
        manifest = json.loads(manifest_bytes)
        members = {name: archive.read(name) for name in manifest["members"]}
        unexpected = set(archive.namelist()) - set(members) - {"__main__.py", "manifest.json"}
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, EOFError) as e:
        fail(f"unreadable artifact ({e}); it is corrupt or truncated: rebuild or re-download it")
    if unexpected:
        fail(f"unexpected members {sorted(unexpected)}; the artifact was modified")
    for name, data in members.items():
        if hashlib.sha256(data).hexdigest() != manifest["members"][name]:
            fail(f"member {name} fails its checksum; the artifact was modified or is corrupt")
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    sources = json.loads(lzma.decompress(members["runtime.xz"], format=lzma.FORMAT_RAW, filters=filters))
    sys.meta_path.insert(0, BundledSources(sources))
    from runtime.cli import main as run_cli
    sys.exit(run_cli(sys.argv[1:], manifest, members.__getitem__))


main()
