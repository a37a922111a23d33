"""Is an artifact's code the code pgbuild writes? A static check for a file someone sent you.

The checksums inside an artifact catch corruption, truncation and the editing of one member, but
a file rewritten whole (new runtime, manifest hashes and bootstrap digest recomputed) passes them
all: no file can vouch for itself. What can tell is a comparison with a trusted pgbuild: the
preamble, the bootstrap and the runtime member are deterministic functions of the pgbuild version
(and of the manifest, for the digest in the bootstrap), so an artifact built by this version must
hold them byte for byte. Its weights and manifest are free to differ; its code is not.
"""

import hashlib
import json
import os

from builder.artifact.pack import PREAMBLE
from builder.artifact.sources import installed_code
from builder.provenance import pgbuild_version
from runtime.artifact import BOOTSTRAP, CODE_MEMBERS, MANIFEST
from runtime.errors import PgError


def reference_code(manifest_bytes):
    """{code member: the bytes this pgbuild writes for an artifact with this manifest}."""
    code = installed_code()
    return {"preamble": PREAMBLE, BOOTSTRAP: code.bootstrap(hashlib.sha256(manifest_bytes).hexdigest()),
            **code.members}


def code_report(art, preamble):
    """{"built_by", "checked_with", "canonical": {member: true/false, or null when the artifact
    names another pgbuild version, whose code this one cannot reproduce}}."""
    built_by, ours = art.manifest.get("pgbuild"), pgbuild_version()
    found = {"preamble": preamble, BOOTSTRAP: art.zip.read(BOOTSTRAP),
             **{name: art.read(name) for name in CODE_MEMBERS[1:] if name in art.manifest["members"]}}
    if built_by is None or built_by != ours:
        canonical = dict.fromkeys(found)
    else:
        reference = reference_code(art.zip.read(MANIFEST))
        canonical = {name: found[name] == reference.get(name) for name in found}
    return {"built_by": built_by, "checked_with": ours, "canonical": canonical}


def submission_check(artifact_path, sha256, submission_path=None):
    """The artifact's SHA-256 against the one a records folder's submission.json states (the given
    file, else a submission.json beside the artifact); None when there is none to compare."""
    path = submission_path or os.path.join(os.path.dirname(os.path.abspath(artifact_path)), "submission.json")
    if submission_path is None and not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            stated = json.load(f).get("artifact_sha256")
    except (OSError, ValueError, AttributeError) as e:
        raise PgError(f"{path}: not a readable submission.json ({e})") from None
    return {"path": path, "artifact_sha256": stated, "matches": None if stated is None else stated == sha256}
