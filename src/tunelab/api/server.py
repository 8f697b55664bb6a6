"""`tunelab api CONFIG`: load the config's model and serve it with uvicorn, configured by LLaMA-Factory's environment
variables.

    API_HOST          address to bind (default 127.0.0.1: only this machine; 0.0.0.0 to serve the network)
    API_PORT          port (default 8000)
    API_KEY           when set, clients must send `Authorization: Bearer <API_KEY>`
    API_MODEL_NAME    the `model` clients name (default: the config's model_name_or_path)
    API_MAX_WAITING   requests that may wait for the model while it is busy; one more gets 429 (default 16)
    API_MEDIA_DIR     a folder whose images and videos clients may name by file:// URL (default: none may be named;
                      images still come as data URLs)
"""

import importlib.util
import logging
import os
from pathlib import Path

from tunelab.config import Config, ConfigError

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


def run_api(config: Config) -> None:
    missing = [name for name in ("fastapi", "uvicorn", "sse_starlette") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"`tunelab api` needs {', '.join(missing)}: pip install 'tunelab[api]'")
    host = os.environ.get("API_HOST", "127.0.0.1")
    port = _int_from_env("API_PORT", 8000, 1)
    max_waiting = _int_from_env("API_MAX_WAITING", 16, 0)
    import uvicorn

    from tunelab.api.app import ApiSettings, create_app
    from tunelab.infer.backends import build_engine

    media_dir = os.environ.get("API_MEDIA_DIR") or None
    if media_dir is not None and not Path(media_dir).is_dir():
        raise ConfigError(f"environment variable API_MEDIA_DIR={media_dir!r}: expected an existing folder")
    settings = ApiSettings(model_name=os.environ.get("API_MODEL_NAME") or config.model_name_or_path,
                           api_key=os.environ.get("API_KEY") or None, max_waiting=max_waiting,
                           media_dir=Path(media_dir) if media_dir else None)
    app = create_app(build_engine(config), settings)
    logger.info("serving %r on http://%s:%d/v1 (docs: http://%s:%d/docs)%s", settings.model_name, host, port, host,
                port, "; API key required" if settings.api_key else "")
    uvicorn.run(app, host=host, port=port, log_level="info")
