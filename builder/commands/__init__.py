"""The `pgbuild` command line: click commands that parse options, call the stages and render."""
