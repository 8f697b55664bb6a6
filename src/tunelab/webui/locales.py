"""The board's words in each language: labels of the page's own parts, and of the config keys.

English labels of config keys come from the schema (the key's name, its help); `locale_zh.KEYS` gives Chinese ones
in the seed guide's terms. Another language is one more entry in `TEXTS` and one more key table in `KEY_TEXTS`.
"""

from tunelab.webui import locale_zh

LANGUAGES = {"en": "English", "zh": "中文"}

#: id -> text, per language. Ids name the page's parts (tabs, sections, buttons, headings).
TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "title": "tunelab board",
        "lang": "Language",
        "tab_train": "Train",
        "tab_evaluate": "Evaluate & Predict",
        "tab_chat": "Chat",
        "tab_export": "Export",
        "tab_runs": "Runs",
        "sec_top": "Model and data",
        "sec_training": "More training options",
        "sec_lora": "LoRA / QLoRA",
        "sec_oft": "OFT (orthogonal fine-tuning)",
        "sec_freeze": "Freeze (partial) tuning",
        "sec_galore": "GaLore optimizer",
        "sec_apollo": "APOLLO optimizer",
        "sec_badam": "BAdam optimizer",
        "sec_data": "More data options",
        "sec_method": "Extra options (Adam-mini, Muon, LLaMA Pro, loss variants, precision)",
        "sec_model": "More model options",
        "sec_preference": "Preference stages (dpo, orpo, simpo, kto)",
        "sec_reward": "Reward and RL stages (ppo, grpo)",
        "sec_generation": "Generation",
        "sec_evaluation": "Benchmark (tunelab eval)",
        "sec_export": "Export",
        "more_keys": "More keys (YAML: any other config key)",
        "preview_data": "Preview data",
        "preview_command": "Preview command",
        "save": "Save",
        "load": "Load",
        "config_path": "Config file (.yaml)",
        "start": "Start",
        "abort": "Abort",
        "resume": "Resume",
        "refresh": "Refresh lists",
        "status": "Status",
        "log": "Log",
        "loss_plot": "Loss",
        "metric_plot": "Stage metric",
        "results": "Results",
        "predict": "Predict",
        "predict_dataset": "Dataset to predict on",
        "predict_dir": "Prediction output folder",
        "run_benchmark": "Run benchmark",
        "predictions": "Predictions",
        "load_model": "Load model",
        "unload_model": "Unload model",
        "system_prompt": "System prompt",
        "tools": "Tools (JSON list of functions)",
        "message": "Message",
        "image": "Image (vision-language models)",
        "send": "Send",
        "clear_history": "Clear history",
        "export": "Export",
        "written": "Written files",
        "runs_table": "Runs",
        "runs_pick": "Runs to compare",
        "runs_config": "Config of the first picked run",
        "no_job": "No job yet.",
    },
    "zh": {
        "title": "tunelab 训练面板",
        "lang": "语言",
        "tab_train": "训练",
        "tab_evaluate": "评估与预测",
        "tab_chat": "对话",
        "tab_export": "导出",
        "tab_runs": "运行记录",
        "sec_top": "模型与数据配置",
        "sec_training": "更多训练配置",
        "sec_lora": "LoRA/QLoRA 配置",
        "sec_oft": "OFT 配置（正交微调）",
        "sec_freeze": "冻结微调配置",
        "sec_galore": "GaLore 配置",
        "sec_apollo": "APOLLO 配置",
        "sec_badam": "BAdam 配置",
        "sec_data": "更多数据配置",
        "sec_method": "其它参数配置（Adam-mini、Muon、LLaMA Pro、损失函数、精度）",
        "sec_model": "更多模型配置",
        "sec_preference": "偏好优化阶段（dpo、orpo、simpo、kto）",
        "sec_reward": "奖励与强化学习阶段（ppo、grpo）",
        "sec_generation": "生成/推理配置",
        "sec_evaluation": "基准评测（tunelab eval）",
        "sec_export": "导出配置",
        "more_keys": "更多参数（YAML：任意其他配置键）",
        "preview_data": "预览数据",
        "preview_command": "预览命令",
        "save": "保存",
        "load": "载入",
        "config_path": "配置文件（.yaml）",
        "start": "开始",
        "abort": "中断",
        "resume": "继续训练",
        "refresh": "刷新列表",
        "status": "状态",
        "log": "日志",
        "loss_plot": "损失",
        "metric_plot": "阶段指标",
        "results": "结果",
        "predict": "开始预测",
        "predict_dataset": "预测数据集",
        "predict_dir": "预测输出目录",
        "run_benchmark": "开始评测",
        "predictions": "预测结果",
        "load_model": "加载模型",
        "unload_model": "卸载模型",
        "system_prompt": "系统提示词",
        "tools": "工具（函数的 JSON 列表）",
        "message": "输入",
        "image": "图像（多模态模型）",
        "send": "发送",
        "clear_history": "清空历史",
        "export": "开始导出",
        "written": "已写入的文件",
        "runs_table": "运行记录",
        "runs_pick": "对比的运行",
        "runs_config": "第一个所选运行的配置",
        "no_job": "尚无任务。",
    },
}

#: config key -> (label, help), per language; English is derived from the schema.
KEY_TEXTS: dict[str, dict[str, tuple[str, str]]] = {"zh": locale_zh.KEYS}
#: Words of key names that English labels spell as their authors do (`galore_rank` -> "GaLore rank").
SPELLING = {"lora": "LoRA", "qlora": "QLoRA", "loraplus": "LoRA+", "rslora": "rsLoRA", "dora": "DoRA", "oft": "OFT",
            "pissa": "PiSSA", "galore": "GaLore", "apollo": "APOLLO", "badam": "BAdam", "adam": "Adam",
            "muon": "Muon", "llama": "LLaMA", "pro": "Pro", "dft": "DFT", "asft": "ASFT", "eaft": "EAFT",
            "moe": "MoE", "fp8": "FP8", "fsdp": "FSDP", "liger": "Liger", "lmhead": "LM head", "lr": "LR",
            "dpo": "DPO", "kto": "KTO", "ppo": "PPO", "grpo": "GRPO", "simpo": "SimPO", "vllm": "vLLM",
            "rope": "RoPE", "hf": "HF", "ddp": "DDP"}


def text(text_id: str, lang: str) -> str:
    return TEXTS.get(lang, TEXTS["en"]).get(text_id) or TEXTS["en"][text_id]


def key_text(key: str, help_en: str, lang: str) -> tuple[str, str]:
    """(label, help) of a config key; the help ends with the key's YAML name, so a user can find it in a file."""
    label, help_text = KEY_TEXTS.get(lang, {}).get(key) or (_english_label(key), help_en)
    return label, f"{help_text} · {key}"


def _english_label(key: str) -> str:
    first, *rest = key.split("_")
    # A name keeps its own first letter: "vLLM maxlen", not "VLLM maxlen".
    return " ".join([SPELLING.get(first, first.capitalize()), *(SPELLING.get(word, word) for word in rest)])
