"""The OpenAI-compatible server (`tunelab api`, the optional extra `api`): `app.py` the routes, `protocol.py` the
request and response shapes, `server.py` start-up from a config and LLaMA-Factory's environment variables.

    API_PORT=8000 API_KEY=secret tunelab api examples/quickstart_chat.yaml
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
"""

from tunelab.api.server import run_api

__all__ = ["run_api"]
