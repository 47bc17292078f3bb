"""`python -m edgecl`: the command line, for environments without the `edgecl` script."""

from edgecl.cli import app

app(prog_name="edgecl")
