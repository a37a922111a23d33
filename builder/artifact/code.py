"""The code an artifact carries: its bootstrap, the runtime that evaluates, and the training code
that makes a new artifact (`python artifact.py train`) where pgbuild is not installed.

Both bundles ship as raw LZMA streams of {module: minified source} (builder/artifact/sources.py
makes them from pgbuild's files). An artifact rebuilt by its own training code carries the same
code bytes: `Code.of_artifact` takes them from the running file, so they stay canonical.
"""

from dataclasses import dataclass

from runtime.artifact import BOOTSTRAP, MANIFEST_DIGEST, RUNTIME, TRAINING

DIGEST_PLACEHOLDER = "@MANIFEST_SHA256@"


@dataclass(frozen=True)
class Code:
    """The code members of an artifact and the pgbuild version its manifest names."""

    version: str | None
    bootstrap_template: str
    """templates/bootstrap.py minified, with DIGEST_PLACEHOLDER where the manifest's SHA-256 goes."""
    members: dict
    """{RUNTIME: bytes, TRAINING: bytes}, compressed."""

    def bootstrap(self, manifest_sha256):
        return self.bootstrap_template.replace(DIGEST_PLACEHOLDER, manifest_sha256).encode()

    @classmethod
    def of_artifact(cls, art):
        """The code of a verified artifact (runtime.artifact.Artifact), to write into the one it trains."""
        placeholder = DIGEST_PLACEHOLDER.encode()
        template = MANIFEST_DIGEST.sub(lambda m: m.group(0)[:-64] + placeholder, art.zip.read(BOOTSTRAP), count=1)
        members = {name: art.read(name) for name in (RUNTIME, TRAINING)}
        return cls(art.manifest.get("pgbuild"), template.decode(), members)
