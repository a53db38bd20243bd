"""Flower ServerApp entry point: hands the grid and context to ``rcsr_flower.server``."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from rcsr_flower.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context)
