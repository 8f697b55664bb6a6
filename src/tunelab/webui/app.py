"""`tunelab webui`: the training board in the browser.

    tunelab webui                                   # http://127.0.0.1:7860
    TUNELAB_WEBUI_AUTH=me:secret GRADIO_SERVER_NAME=0.0.0.0 tunelab webui

Binds to loopback unless GRADIO_SERVER_NAME says otherwise, and then only with a login: TUNELAB_WEBUI_AUTH holds
`user:password`, or the path of a file with one such line per user. GRADIO_SERVER_PORT picks the port and
GRADIO_ROOT_PATH the path behind a reverse proxy (gradio reads it). Runs go under TUNELAB_SAVES_DIR (default
`saves`). Analytics are off. gradio is the optional extra `webui`: `pip install 'tunelab[webui]'`.
"""

import importlib.util
import ipaddress
import os
from pathlib import Path

from tunelab.config import ConfigError

LOOPBACK_NAMES = ("localhost",)


def read_logins(setting: str | None) -> list[tuple[str, str]]:
    """`user:password`, or a file of such lines (blank lines and # comments skipped); ConfigError when malformed."""
    if not setting:
        return []
    path = Path(setting)
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else [setting]
    where = str(path) if path.is_file() else "TUNELAB_WEBUI_AUTH"
    logins = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ConfigError(f"{where}:{number}: expected `user:password`")
        logins.append((user, password))
    return logins


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_webui() -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if importlib.util.find_spec("gradio") is None:
        raise ConfigError("`tunelab webui` needs gradio: pip install 'tunelab[webui]'")
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    logins = read_logins(os.environ.get("TUNELAB_WEBUI_AUTH"))
    if not is_loopback(host) and not logins:
        raise ConfigError(f"GRADIO_SERVER_NAME={host} makes the board reachable from other machines, where anyone "
                          f"could start jobs on this one: set TUNELAB_WEBUI_AUTH=user:password (or a file of such "
                          f"lines), or bind to 127.0.0.1")
    import gradio as gr

    from tunelab.webui.board import CSS
    from tunelab.webui.page import build_board

    demo = build_board(Path(os.environ.get("TUNELAB_SAVES_DIR", "saves")))
    launch = dict(server_name=host, server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                  auth=logins or None, show_error=True)
    # gradio 6 takes the page's CSS at launch; gradio 5 at Blocks().
    if int(gr.__version__.split(".")[0]) >= 6:
        launch["css"] = CSS
    else:
        demo.css = CSS
    demo.queue(default_concurrency_limit=4).launch(**launch)
