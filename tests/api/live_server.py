"""A real `tunelab api` server for the tests of tests/api: uvicorn on a free local port, in a background thread.
Test modules import it from here (after `pytest.importorskip("fastapi")`), never from each other."""

import socket
import threading
import time

import uvicorn

from tunelab.api.app import ApiSettings, create_app

KEY = "test-key"


class Server:
    """A real uvicorn server on a free local port, in a background thread."""

    def __init__(self, app) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = KEY):
        """The official `openai` client against this server (the caller has checked that `openai` is installed)."""
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(engine, **settings) -> Server:
    return Server(create_app(engine, ApiSettings(model_name="tiny", api_key=KEY, **settings)))
