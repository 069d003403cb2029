"""`python -m brigade ...` runs the same CLI as the `brigade` console script."""

from brigade.cli import app

app(prog_name="brigade")
