"""Flower ServerApp entry point: hands the grid and context to ``rcsr_flower.server.app``."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # imported here, not at the top: Flower's simulation loads this module before it
    # starts Ray, so torch & co. load in the ServerApp's thread while the nodes start
    from rcsr_flower.server.app import run_server

    run_server(grid, context)
