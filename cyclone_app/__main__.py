from cyclone_app.cli import app

app(prog_name="cyclone")
