from builder.cli import main

main(prog_name="pgbuild")
