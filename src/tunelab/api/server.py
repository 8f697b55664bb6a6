"""`tunelab api CONFIG`: load the config's model and serve it with uvicorn, configured by LLaMA-Factory's environment
variables.

    API_HOST          address to bind (default 127.0.0.1: only this machine; 0.0.0.0 to serve the network)
    API_PORT          port (default 8000)
    API_KEY           when set, clients must send `Authorization: Bearer <API_KEY>`
    API_MODEL_NAME    the `model` clients name (default: the config's model_name_or_path)
    API_MAX_WAITING   requests that may wait for the model while it is busy; one more gets 429 (default 16)
    API_MEDIA_DIR     a folder whose images and videos clients may name by file:// URL (default: none may be named;
                      images still come as data URLs)
    API_MAX_BODY_MB   a larger request body gets 413 (default 8; a base64 image is 4/3 of its file's size)
    API_BODY_TIMEOUT  seconds a request body may take to arrive whole, or 408 (default 30)

uvicorn's own limits stay as they are: request headers of at most 16 KiB (h11_max_incomplete_event_size), idle
keep-alive connections closed after 5 s (timeout_keep_alive), and no cap on connections (limit_concurrency): the
model's queue already answers an overload with 429, and a cap would let clients that stall their bodies shut out
everyone else until API_BODY_TIMEOUT. uvicorn puts no deadline on the headers themselves: serve the network through
a reverse proxy that does.
"""

import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import Config, ConfigError

if TYPE_CHECKING:   # app.py imports FastAPI, an optional extra that run_api checks for first
    from tunelab.api.app import ApiSettings

logger = logging.getLogger(__name__)


def _int_from_env(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise ConfigError(f"environment variable {name}={raw!r}: expected at least {minimum}")
    return value


def api_settings(config: Config) -> "ApiSettings":
    """The server's settings from the environment (ConfigError for a value it cannot use)."""
    from tunelab.api.app import ApiSettings

    media_dir = os.environ.get("API_MEDIA_DIR") or None
    if media_dir is not None and not Path(media_dir).is_dir():
        raise ConfigError(f"environment variable API_MEDIA_DIR={media_dir!r}: expected an existing folder")
    return ApiSettings(model_name=os.environ.get("API_MODEL_NAME") or config.model_name_or_path,
                       api_key=os.environ.get("API_KEY") or None, max_waiting=_int_from_env("API_MAX_WAITING", 16, 0),
                       media_dir=Path(media_dir) if media_dir else None,
                       max_body_bytes=_int_from_env("API_MAX_BODY_MB", 8, 1) * 2**20,
                       body_timeout=_int_from_env("API_BODY_TIMEOUT", 30, 1))


def run_api(config: Config) -> None:
    missing = [name for name in ("fastapi", "uvicorn", "sse_starlette") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"`tunelab api` needs {', '.join(missing)}: pip install 'tunelab[api]'")
    host = os.environ.get("API_HOST", "127.0.0.1")
    port = _int_from_env("API_PORT", 8000, 1)
    settings = api_settings(config)
    import uvicorn

    from tunelab.api.app import create_app
    from tunelab.infer.backends import build_engine

    app = create_app(build_engine(config), settings)
    logger.info("serving %r on http://%s:%d/v1 (docs: http://%s:%d/docs)%s", settings.model_name, host, port, host,
                port, "; API key required" if settings.api_key else "")
    uvicorn.run(app, host=host, port=port, log_level="info")
