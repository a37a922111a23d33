"""An artifact's own runtime, imported from its `runtime.xz` member for `pgbuild verify`.

The sources are loaded into a private package (`_pgverify_N`), never the builder's `runtime`, so a
tampered or simply different runtime is exactly what gets verified.
"""

import importlib
import importlib.abc
import importlib.util
import inspect
import itertools
import json
import lzma
import sys

from builder.provenance import pgbuild_version
from runtime.codec import LZMA_FILTERS
from runtime.errors import PgError

REQUIRED_MODULES = ("runtime.errors", "runtime.config", "runtime.evaluate", "runtime.api")
"""What verify calls into: errors (PgError), config (EvalConfig), evaluate (the scoring), api (load_model)."""
_namespaces = itertools.count()


class _SourceFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports modules of a private package from source texts held in memory."""

    def __init__(self, sources, origin):
        self.sources, self.origin = sources, origin

    def find_spec(self, name, path=None, target=None):
        if name in self.sources:
            return importlib.util.spec_from_loader(name, self, is_package="." not in name)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        exec(compile(self.sources[module.__name__], f"<{self.origin}:{module.__name__}>", "exec"), module.__dict__)


class BundledRuntime:
    """An artifact's runtime sources imported as a private package (`_pgverify_N`), so the
    builder's own `runtime` is never touched; `close()` drops the modules again."""

    def __init__(self, sources, origin, built_by=None):
        bad = [n for n in sources if n != "runtime" and not n.startswith("runtime.")]
        missing = [n for n in REQUIRED_MODULES if n not in sources]
        if bad:
            raise PgError(f"{origin}: runtime.xz holds {sorted(bad)}, outside the runtime package")
        if missing:
            # What verify calls moved in pgbuild 0.2.0 (runtime.api): an older artifact is not damaged, only older.
            raise PgError(f"{origin}: its runtime lacks {', '.join(missing)}, which verify calls: it was packed by "
                          f"pgbuild {built_by or 'of an unknown version'}, this is {pgbuild_version()}; "
                          "pack it again with this pgbuild to verify it")
        self.package = f"_pgverify_{next(_namespaces)}"
        renamed = {self.package + name[len("runtime"):]: text for name, text in sources.items()}
        finder = _SourceFinder(renamed, origin)
        sys.meta_path.insert(0, finder)
        try:
            # Everything is imported now, while the finder is in place: the runtime's function-level
            # relative imports then find their modules in sys.modules.
            self.modules = {name: importlib.import_module(name) for name in sorted(renamed, key=len)}
        except Exception as e:
            self.close()
            raise PgError(f"{origin}: the bundled runtime fails to import ({type(e).__name__}: {e})") from None
        finally:
            sys.meta_path.remove(finder)
        self.errors, self.config, self.evaluate, self.api = (self.module(n[len("runtime."):]) for n in REQUIRED_MODULES)
        params = inspect.signature(self.evaluate.evaluate).parameters
        if not {"on_score", "on_train"} <= set(params):
            self.close()
            raise PgError(f"{origin}: the bundled evaluate() has no on_score/on_train hooks, so it cannot be verified")

    def module(self, short):
        return self.modules[f"{self.package}.{short}"]

    def call(self, fn, *args, **kwargs):
        """Run a function of the artifact's code; its failures become one-line errors."""
        try:
            return fn(*args, **kwargs)
        except self.errors.PgError as e:
            raise PgError(f"the artifact's runtime: {e}") from None
        except PgError:
            raise
        except Exception as e:
            raise PgError(f"the artifact's evaluation code failed ({type(e).__name__}: {e})") from None

    def close(self):
        for name in [n for n in sys.modules if n == self.package or n.startswith(self.package + ".")]:
            del sys.modules[name]


def bundled_sources(art):
    """{module: source} from the artifact's verified runtime.xz member."""
    try:
        return json.loads(lzma.decompress(art.read("runtime.xz"), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS))
    except (lzma.LZMAError, ValueError) as e:
        raise PgError(f"{art.path}: runtime.xz does not decode to the runtime sources ({e})") from None
