"""The `tunelab` command line.

    tunelab train examples/quickstart.yaml learning_rate=2e-4 --max_steps 10
    tunelab env
    tunelab help keys

Start-up stays light (no torch, no transformers) so `--help` and config errors answer at once; each command imports
what it needs when it runs. A config error exits with status 2 and one message, never a traceback.
"""

import importlib
import sys
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING

from tunelab import __version__

if TYPE_CHECKING:
    from tunelab.config import Config

USAGE = f"""tunelab {__version__}: fine-tune open-weight LLMs from one YAML file.

usage: tunelab <command> [arguments]

commands:
  train [CONFIG] [key=value | --key value ...]
                   train as CONFIG (.yaml or .json) says; later values override earlier ones.
                   Without CONFIG the keys alone are the config, as LLaMA-Factory's command line takes them:
                   tunelab train --stage sft --model_name_or_path M --dataset D --output_dir OUT --do_train
                   (every command taking CONFIG takes the keys alone too)
  train CONFIG --dry-run
                   build the run and time a few of its steps, keeping nothing: parameters, the memory of a step
                   (weights, gradients, optimizer state, activations, logits) and the time per step and of the run
  data preview CONFIG [-n N] [key=value ...]
                   show N tokenized samples with their trained tokens highlighted, and statistics
                   per dataset (kept and skipped samples, lengths, truncation), without loading weights
  chat CONFIG      chat with the model in the terminal (streamed; `clear` forgets the history, `exit` leaves)
  api CONFIG       serve the model through an OpenAI-compatible API (API_HOST, API_PORT, API_KEY,
                   API_MODEL_NAME; default 127.0.0.1:8000)
  webchat CONFIG   a chat page in the browser (gradio; GRADIO_SERVER_NAME/PORT, default 127.0.0.1:7860)
  webui            the training board in the browser: train, evaluate, chat, export, compare runs
                   (127.0.0.1:7860; another address needs TUNELAB_WEBUI_AUTH=user:password)
  export CONFIG    merge the adapters and write the model to export_dir (safetensors, tokenizer, Modelfile)
  expand MODEL OUTPUT_DIR --num_expand N
                   LLaMA Pro: insert N blocks that leave the output unchanged (then train with use_llama_pro)
  eval CONFIG      multiple-choice benchmark (task: mmlu_test, ceval_validation, cmmlu_test, sample_test)
  env              versions of the stack and the machine's CPU/GPU, for bug reports
  version          print the version
  help [keys]      this text, or every config key with its type, default and meaning

Multi-GPU: `tunelab train` starts one process per visible GPU through torchrun;
set FORCE_TORCHRUN=1 (and NPROC_PER_NODE=N) to do so on CPU as well.
"""


class UsageError(Exception):
    """The command line itself is malformed."""


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`key=value`, `--key value`, `--key=value` and bare `--flag` (meaning true), in order."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--") and "=" not in args[i + 1]:
                key, value = body, args[i + 1]
                i += 1
            else:
                key, value = body, "true"
        elif "=" in arg:
            key, value = arg.split("=", 1)
        else:
            raise UsageError(f"cannot read argument {arg!r}: expected key=value or --key value")
        if not key:
            raise UsageError(f"argument {arg!r} has no key name")
        pairs.append((key, value))
        i += 1
    return pairs


def load_config_args(args: list[str]) -> "Config":
    """The config of `CONFIG [key=value | --key value ...]`, or of the keys alone (no file), as LLaMA-Factory's
    command line takes them: `tunelab train --stage sft --model_name_or_path ... --dataset ...`."""
    from tunelab.config import load_config

    if args[0].startswith("--") or "=" in args[0]:
        return load_config({}, parse_overrides(args))
    return load_config(args[0], parse_overrides(args[1:]))


def cmd_train(args: list[str]) -> int:
    # A flag, not a config key: taken out before the keys are read, so it never swallows the word after it.
    dry_run = "--dry-run" in args
    args = [arg for arg in args if arg != "--dry-run"]
    if not args or args[0] in ("-h", "--help"):
        print("usage: tunelab train [CONFIG] [key=value | --key value ...] [--dry-run]\n"
              "Keys and their defaults: `tunelab help keys`. Example: tunelab train examples/quickstart.yaml\n"
              "Without a file: tunelab train --stage sft --model_name_or_path M --dataset D --output_dir OUT ...\n"
              "--dry-run: build the run and time a few of its steps, then report parameters, the memory of a step\n"
              "and the time per step and of the run; nothing is saved and output_dir is left alone")
        return 0
    config = load_config_args(args)
    from tunelab.data import resolve_datasets

    # Dataset names and files are checked now, before torch loads, so a typo costs a moment rather than a minute.
    resolve_datasets(config.dataset, config.dataset_dir, config.stage)
    resolve_datasets(config.eval_dataset, config.dataset_dir, config.stage)
    if dry_run:
        from tunelab.training.dry_run import dry_run as measure

        # One process, never torchrun: the report says how many the run would start.
        print(measure(config))
        return 0
    from tunelab.training.launch import relaunch_under_torchrun_if_needed

    if relaunch_under_torchrun_if_needed(["train", *args]):
        return 0
    from tunelab.training.run import run_training

    run_training(config)
    return 0


def cmd_data(args: list[str]) -> int:
    usage = "usage: tunelab data preview [CONFIG] [-n N] [key=value | --key value ...]"
    if {"-h", "--help"} & set(args[:2]):
        print(usage)
        return 0
    if len(args) < 2 or args[0] != "preview":
        raise UsageError(usage)
    rest, samples = args[1:], 3
    for flag in ("-n", "--samples"):
        if flag in rest:
            at = rest.index(flag)
            if at + 1 >= len(rest) or not rest[at + 1].isdigit():
                raise UsageError(f"{flag} needs a number of samples")
            samples = int(rest[at + 1])
            rest = rest[:at] + rest[at + 2:]
    if not rest:
        raise UsageError(usage)
    config = load_config_args(rest)
    from tunelab.data import prepare_template, preview
    from tunelab.model import load_tokenizer
    from tunelab.training.run import setup_logging

    setup_logging()
    tokenizer = load_tokenizer(config)
    print(preview(config, tokenizer, prepare_template(config, tokenizer), samples))
    return 0


def _config_of(command: str, args: list[str], what: str) -> "Config | None":
    """The config of a command taking CONFIG [key=value ...]; None after printing its usage for --help."""
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: tunelab {command} [CONFIG] [key=value | --key value ...]\n{what}")
        return None
    config = load_config_args(args)
    from tunelab.training.run import setup_logging

    setup_logging()
    return config


def cmd_chat(args: list[str]) -> int:
    config = _config_of("chat", args, "Chat with the model in the terminal. Example: tunelab chat "
                                      "examples/quickstart_chat.yaml")
    if config is None:
        return 0
    from tunelab.infer.backends import build_engine
    from tunelab.infer.engine import RequestError

    engine = build_engine(config)
    media_help = "`/image PATH` or `/video PATH` attaches a file to your next message, " if engine.media else ""
    print(f"Chat with the model: {media_help}`clear` forgets the history, `exit` leaves.")
    history: list[dict] = []
    attached: list[dict] = []   # image and video parts for the next message
    while True:
        try:
            query = input("\nUser: ").strip()
        except EOFError:
            print()
            return 0
        if query == "exit":
            return 0
        if query == "clear":
            history, attached = [], []
            print("History cleared.")
            continue
        kind, _, path = query.partition(" ")
        if kind in ("/image", "/video") and path:
            file = Path(path.strip()).expanduser()
            if not file.is_file():
                print(f"[not attached: {file} is not a file]")
                continue
            attached.append({"type": kind[1:], kind[1:]: str(file)})
            print(f"[{kind[1:]} {file} goes with your next message]")
            continue
        if not query:
            continue
        message = {"role": "user", "content": [*attached, {"type": "text", "text": query}] if attached else query}
        print("Assistant: ", end="", flush=True)
        try:
            for delta in engine.stream([*history, message]):
                print(delta.text, end="", flush=True)
                reply = delta.reply
        except RequestError as err:
            print(f"\n[not answered: {err}]")
            continue
        print()
        history += [message, {"role": "assistant", "content": reply.text}]
        attached = []


#: command -> (module, function taking the Config, what the command does): commands that load the config's model and
#: hand it to one function.
MODEL_COMMANDS = {
    "api": ("tunelab.api", "run_api", "Serve the model through an OpenAI-compatible API. Environment: API_HOST "
                                      "(127.0.0.1), API_PORT (8000), API_KEY, API_MODEL_NAME, API_MAX_WAITING, "
                                      "API_MEDIA_DIR, API_MAX_BODY_MB (8), API_BODY_TIMEOUT (30 s)."),
    "webchat": ("tunelab.webui.chat", "run_webchat", "A chat page for the model in the browser (gradio). "
                                                     "Environment: GRADIO_SERVER_NAME (127.0.0.1), GRADIO_SERVER_PORT "
                                                     "(7860)."),
    "export": ("tunelab.model.export", "export_model", "Merge the adapters into the base model and write it to "
                                                       "export_dir. Example: tunelab export "
                                                       "examples/quickstart_export.yaml"),
    "eval": ("tunelab.eval.multiple_choice", "run_benchmark", "Score the model on a multiple-choice benchmark. "
                                                              "Example: tunelab eval examples/smollm2_eval.yaml"),
}


def model_command(name: str) -> Callable[[list[str]], int]:
    module, function, what = MODEL_COMMANDS[name]

    def run(args: list[str]) -> int:
        config = _config_of(name, args, what)
        if config is not None:
            getattr(importlib.import_module(module), function)(config)
        return 0

    return run


def cmd_expand(args: list[str]) -> int:
    usage = ("usage: tunelab expand MODEL OUTPUT_DIR --num_expand N [--trust_remote_code]\n"
             "LLaMA Pro: insert N decoder blocks that leave the model's output unchanged, one after every L/N layers\n"
             "(MODEL: a local folder, hub id, .gguf file or tunelab: name). Then train the new folder with\n"
             "`use_llama_pro: true` and `freeze_trainable_layers: N` (finetuning_type freeze or lora).")
    if {"-h", "--help"} & set(args):
        print(usage)
        return 0
    if len(args) < 2 or args[0].startswith("--") or args[1].startswith("--"):
        raise UsageError(usage)
    options = dict(parse_overrides(args[2:]))
    if set(options) - {"num_expand", "trust_remote_code"} or not options.get("num_expand", "").isdigit():
        raise UsageError(usage)
    from tunelab.model.llama_pro import expand_blocks
    from tunelab.training.run import setup_logging

    setup_logging()
    expand_blocks(args[0], args[1], int(options["num_expand"]),
                  trust_remote_code=options.get("trust_remote_code", "false").lower() == "true")
    return 0


def cmd_webui(args: list[str]) -> int:
    if args:
        print("usage: tunelab webui\nThe training board. Environment: GRADIO_SERVER_NAME (127.0.0.1), "
              "GRADIO_SERVER_PORT (7860), GRADIO_ROOT_PATH, TUNELAB_WEBUI_AUTH (user:password or a file of such "
              "lines; required off loopback), TUNELAB_SAVES_DIR (saves).")
        return 0 if args[0] in ("-h", "--help") else 2
    from tunelab.webui.app import run_webui

    run_webui()
    return 0


def cmd_env(args: list[str]) -> int:
    from tunelab.env import describe_environment

    print(describe_environment())
    return 0


def cmd_version(args: list[str]) -> int:
    print(__version__)
    return 0


def cmd_help(args: list[str]) -> int:
    if args and args[0] == "keys":
        from tunelab.config.load import describe_keys

        print(describe_keys())
        return 0
    if args and args[0] in COMMANDS:
        return COMMANDS[args[0]](["--help"])
    print(USAGE)
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": cmd_train,
    "data": cmd_data,
    "chat": cmd_chat,
    **{name: model_command(name) for name in MODEL_COMMANDS},
    "expand": cmd_expand,
    "webui": cmd_webui,
    "env": cmd_env,
    "version": cmd_version,
    "help": cmd_help,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # DeepSpeed's launcher puts `--local_rank=N` before the command; LOCAL_RANK in the environment says the same.
    argv = [arg for arg in argv if not arg.startswith("--local_rank=")]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        return cmd_version([])
    command = COMMANDS.get(argv[0])
    if command is None:
        import difflib

        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        print(f"tunelab: unknown command `{argv[0]}`{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    from tunelab.config import ConfigError

    try:
        return command(argv[1:])
    except (ConfigError, UsageError) as err:
        print(f"tunelab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunelab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
