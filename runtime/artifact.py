"""Reading an artifact: a text preamble followed by a zip archive.

Members: `__main__.py` (the bootstrap, which holds the manifest's SHA-256), `manifest.json`
(which holds the SHA-256 of every other member), the code (`runtime.xz`, which evaluates, and
`training.xz`, which trains a new artifact) and the weight streams `w/*`.
Everything is checked against those digests before it is used.
"""

import hashlib
import json
import re
import zipfile
import zlib  # zlib.error: what a damaged deflated member raises

from .errors import PgError

BUDGET_BYTES = 16_000_000
"""The challenge's cap on an artifact: code plus compressed model, in bytes (decimal MB)."""
BOOTSTRAP = "__main__.py"
MANIFEST = "manifest.json"
RUNTIME = "runtime.xz"
TRAINING = "training.xz"
CODE_MEMBERS = (BOOTSTRAP, RUNTIME, TRAINING)
"""The members that hold code: what the challenge counts as code bytes."""
MANIFEST_DIGEST = re.compile(rb"MANIFEST_SHA256 = ['\"]([0-9a-f]{64})")


class Artifact:
    """A verified view of an artifact file; members are read on demand."""

    def __init__(self, path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
            bootstrap = self.zip.read(BOOTSTRAP)
            raw_manifest = self.zip.read(MANIFEST)
        except (OSError, zipfile.BadZipFile, zlib.error, KeyError, EOFError) as e:
            raise PgError(f"{path}: not a readable pgbuild artifact ({e}); it is corrupt, truncated or empty") from None
        expected = MANIFEST_DIGEST.search(bootstrap)
        if expected is None or hashlib.sha256(raw_manifest).hexdigest() != expected.group(1).decode():
            raise PgError(f"{path}: manifest checksum mismatch; the artifact was modified or is corrupt")
        self.manifest = json.loads(raw_manifest)
        names = set(self.zip.namelist())
        listed = set(self.manifest["members"]) | {BOOTSTRAP, MANIFEST}
        if names != listed:
            raise PgError(f"{path}: members {sorted(names ^ listed)} do not match the manifest; "
                          "the artifact was modified")

    def read(self, name):
        """A member's bytes, after checking its SHA-256 against the manifest."""
        try:
            data = self.zip.read(name)
        except (OSError, zipfile.BadZipFile, zlib.error, KeyError, EOFError) as e:
            raise PgError(f"{self.path}: cannot read member {name} ({e}); the artifact is corrupt") from None
        if hashlib.sha256(data).hexdigest() != self.manifest["members"][name]:
            raise PgError(f"{self.path}: member {name} fails its checksum; the artifact was modified or is corrupt")
        return data

    def verify(self):
        for name in self.manifest["members"]:
            self.read(name)
        return self
