"""Fixtures every part of the suite may use."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """One torch thread for small models: on a shared 2-core machine, two spinning OpenMP threads per process cost
    far more than they give (measured here: a 10x slower training step under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def serve_folder():
    """serve_folder(folder) → the base URL of an HTTP server on 127.0.0.1 serving that folder (stopped afterwards):
    download paths are tested against it, never against the internet."""
    import functools
    import http.server
    import threading

    servers = []

    def start(folder) -> str:
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
