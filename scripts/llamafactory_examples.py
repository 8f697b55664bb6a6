"""How many of LLaMA-Factory's example configs tunelab's loader accepts, and why it refuses the others.

    .venv/bin/python scripts/llamafactory_examples.py PATH/TO/LLaMA-Factory/examples

Hardware-specific folders are left out, as the compatibility promise does (Ascend NPUs, KTransformers, and the
accelerate launcher files, which configure `accelerate launch` rather than a run), and the special-token file of
`new_special_tokens_config`, which is not a config. A refusal for a missing optional
package is counted apart: the same file loads where the package is installed.
"""

import sys
from pathlib import Path

from tunelab.config import ConfigError, load_config

SKIPPED = ("ascend", "ktransformers", "accelerate")
NOT_CONFIGS = ("tokens_cfg.yaml",)


def main(examples: Path) -> None:
    loaded, refused, missing_package = [], [], []
    for path in sorted(examples.rglob("*.yaml")):
        relative = path.relative_to(examples)
        if relative.parts[0] in SKIPPED or relative.name in NOT_CONFIGS:
            continue
        try:
            load_config(path)
        except ConfigError as err:
            message = " | ".join(line.strip(" -") for line in str(err).splitlines() if line.strip())
            message = message.replace(f"{path}: ", "")
            (missing_package if "which is not installed" in message else refused).append((relative, message))
        else:
            loaded.append(relative)
    total = len(loaded) + len(refused) + len(missing_package)
    for relative in loaded:
        print(f"loads    {relative}")
    for relative, message in missing_package:
        print(f"package  {relative}: {message}")
    for relative, message in refused:
        print(f"refused  {relative}: {message}")
    print(f"\n{len(loaded)} of {total} load ({100 * len(loaded) / total:.0f}%); {len(missing_package)} more with "
          f"their optional packages installed ({100 * (len(loaded) + len(missing_package)) / total:.0f}%)")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
