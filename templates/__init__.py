"""Files that pgbuild copies into artifacts (installed as package data)."""
