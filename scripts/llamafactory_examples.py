"""How many of LLaMA-Factory's example configs tunelab accepts (the config and its datasets), and why it refuses
the others.

    .venv/bin/python scripts/llamafactory_examples.py PATH/TO/LLaMA-Factory

It runs from that folder, as LLaMA-Factory's examples expect (their dataset yamls name `data/...`), and reads every
config under its `examples/`.

Hardware-specific folders are left out, as the compatibility promise does (Ascend NPUs, KTransformers, and the
accelerate launcher files, which configure `accelerate launch` rather than a run), and the special-token file of
`new_special_tokens_config`, which is not a config. A refusal for a missing optional
package is counted apart (the same file loads where the package is installed), and so is a dataset missing from
LLaMA-Factory's own data/dataset_info.json (the example fails in LLaMA-Factory as well).
"""

import os
import sys
from pathlib import Path

from tunelab.config import ConfigError, load_config
from tunelab.data import resolve_datasets

SKIPPED = ("ascend", "ktransformers", "accelerate")
NOT_CONFIGS = ("tokens_cfg.yaml",)


def main(examples: Path) -> None:
    loaded, refused, missing_package, missing_dataset = [], [], [], []
    for path in sorted(examples.rglob("*.yaml")):
        relative = path.relative_to(examples)
        if relative.parts[0] in SKIPPED or relative.name in NOT_CONFIGS:
            continue
        try:
            # What `tunelab train` checks before anything slow: the config, then its datasets.
            config = load_config(path)
            resolve_datasets(config.dataset, config.dataset_dir, config.stage)
            resolve_datasets(config.eval_dataset, config.dataset_dir, config.stage)
        except ConfigError as err:
            message = " | ".join(line.strip(" -") for line in str(err).splitlines() if line.strip())
            message = message.replace(f"{path}: ", "")
            kind = (missing_package if "which is not installed" in message
                    else missing_dataset if "no dataset named" in message else refused)
            kind.append((relative, message))
        else:
            loaded.append(relative)
    total = len(loaded) + len(refused) + len(missing_package) + len(missing_dataset)
    for relative in loaded:
        print(f"loads    {relative}")
    for relative, message in missing_package:
        print(f"package  {relative}: {message}")
    for relative, message in missing_dataset:
        print(f"dataset  {relative}: {message}")
    for relative, message in refused:
        print(f"refused  {relative}: {message}")
    runnable = len(loaded) + len(missing_package)
    print(f"\n{len(loaded)} of {total} load ({100 * len(loaded) / total:.0f}%); {runnable} with their optional "
          f"packages installed ({100 * runnable / total:.0f}%); {len(missing_dataset)} name a dataset "
          f"LLaMA-Factory lacks; {len(refused)} refused")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "examples").is_dir():
        sys.exit(__doc__)
    os.chdir(sys.argv[1])
    main(Path("examples"))
