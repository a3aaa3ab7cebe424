"""`python -m cyclone_app ...`: the `cyclone` command, as the console script runs it."""

from cyclone_app.cli import app

app(prog_name="cyclone")
