from pagecast.cli import app

app(prog_name="pagecast")
