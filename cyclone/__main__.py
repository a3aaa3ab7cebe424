from cyclone.cli import app

app(prog_name="cyclone")
