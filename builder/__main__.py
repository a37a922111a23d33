from builder.commands.main import main

main(prog_name="pgbuild")
