"""What the top bar offers: known models, the template suggested for a model, and the adapters trained from it.

Runs are laid out as LLaMA Board lays them out: `<output root>/<model name>/<method>/<run>`, so the adapters of a
model are the LoRA runs in its folder.
"""

import re
import time
from pathlib import Path

from tunelab.data.template import TEMPLATES
from tunelab.webui.fields import AUTO_TEMPLATE

#: Models offered in the model list (any hub id, local folder or .gguf file may be typed instead).
KNOWN_MODELS = (
    "tunelab:smollm2-135m-instruct",
    "meta-llama/Llama-3.2-1B-Instruct",
    "meta-llama/Meta-Llama-3-8B-Instruct",
    "Qwen/Qwen2.5-7B-Instruct",
    "Qwen/Qwen3-8B",
    "Qwen/Qwen2.5-VL-7B-Instruct",
    "THUDM/glm-4-9b-chat",
    "mistralai/Mistral-7B-Instruct-v0.3",
    "google/gemma-2-9b-it",
    "microsoft/Phi-3.5-mini-instruct",
    "01-ai/Yi-1.5-9B-Chat",
)
#: A model name's family (searched in order, lower case) -> the template it is trained with.
FAMILY_TEMPLATES = (
    ("smollm2", "chatml"), ("llama-3", "llama3"), ("llama3", "llama3"), ("llama-2", "llama2"), ("qwen3", "qwen3"),
    ("qwen2-vl", "qwen2_vl"), ("qwen2.5-vl", "qwen2_vl"), ("qwen", "qwen"), ("chatglm3", "chatglm3"),
    ("glm-4", "glm4"), ("ministral", "ministral"), ("mistral", "mistral"), ("gemma-3", "gemma3"),
    ("gemma-2", "gemma2"), ("gemma", "gemma"), ("phi-4", "phi4"), ("phi", "phi"), ("yi-", "yi"),
    ("baichuan2", "baichuan2"), ("deepseek-r1", "deepseekr1"), ("deepseek", "deepseek3"),
)
#: Optimizers offered in the list (the seed guide's AdamW, AdamW 8bit and SGD first); any other name may be typed.
OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit", "sgd", "adamw_torch_fused", "paged_adamw_8bit", "adafactor",
              "galore_adamw", "apollo_adamw")


def template_names() -> list[str]:
    return [AUTO_TEMPLATE, *sorted(TEMPLATES)]


#: Lists that do not change while the board runs.
FIXED_CHOICES = {"model_name_or_path": KNOWN_MODELS, "optim": OPTIMIZERS, "template": template_names()}


def suggest_template(model: str | None) -> str:
    name = (model or "").lower()
    for family, template in FAMILY_TEMPLATES:
        if family in name:
            return template
    return AUTO_TEMPLATE


def model_folder_name(model: str | None) -> str:
    """The folder runs of this model go in: the last part of its id or path, without `tunelab:` or `.gguf`."""
    name = (model or "model").removeprefix("tunelab:").rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^\w.-]+", "_", name.removesuffix(".gguf")) or "model"


def adapters_of(root: Path, model: str | None) -> list[str]:
    """LoRA runs of this model under the output root, newest first."""
    folder = Path(root) / model_folder_name(model)
    found = [path.parent for path in folder.glob("*/*/adapter_config.json")]
    return [str(path) for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def new_run_folder(root: Path, model: str | None, method: str | None, kind: str = "train") -> str:
    stamp = time.strftime("%Y-%m-%d-%H-%M-%S")
    return str(Path(root) / model_folder_name(model) / (method or "lora") / f"{kind}_{stamp}")
