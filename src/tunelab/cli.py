"""The `tunelab` command line.

    tunelab train examples/quickstart.yaml learning_rate=2e-4 --max_steps 10
    tunelab env
    tunelab help keys

Start-up stays light (no torch, no transformers) so `--help` and config errors answer at once; each command imports
what it needs when it runs. A config error exits with status 2 and one message, never a traceback.
"""

import sys
from collections.abc import Callable

from tunelab import __version__

USAGE = f"""tunelab {__version__}: fine-tune open-weight LLMs from one YAML file.

usage: tunelab <command> [arguments]

commands:
  train CONFIG [key=value | --key value ...]
                   train as CONFIG (.yaml or .json) says; later values override earlier ones
  data preview CONFIG [-n N] [key=value ...]
                   show N tokenized samples with their trained tokens highlighted, and statistics
                   per dataset (kept and skipped samples, lengths, truncation), without loading weights
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


def cmd_train(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print("usage: tunelab train CONFIG [key=value | --key value ...]\n"
              "Keys and their defaults: `tunelab help keys`. Example: tunelab train examples/quickstart.yaml")
        return 0
    from tunelab.config import load_config

    config = load_config(args[0], parse_overrides(args[1:]))
    from tunelab.data import resolve_datasets

    # Dataset names and files are checked now, before torch loads, so a typo costs a moment rather than a minute.
    resolve_datasets(config.dataset, config.dataset_dir, config.stage)
    resolve_datasets(config.eval_dataset, config.dataset_dir, config.stage)
    from tunelab.training.launch import relaunch_under_torchrun_if_needed

    if relaunch_under_torchrun_if_needed(["train", *args]):
        return 0
    from tunelab.training.run import run_training

    run_training(config)
    return 0


def cmd_data(args: list[str]) -> int:
    usage = "usage: tunelab data preview CONFIG [-n N] [key=value | --key value ...]"
    if {"-h", "--help"} & set(args[:2]):
        print(usage)
        return 0
    if len(args) < 2 or args[0] != "preview":
        raise UsageError(usage)
    rest, samples = args[2:], 3
    for flag in ("-n", "--samples"):
        if flag in rest:
            at = rest.index(flag)
            if at + 1 >= len(rest) or not rest[at + 1].isdigit():
                raise UsageError(f"{flag} needs a number of samples")
            samples = int(rest[at + 1])
            rest = rest[:at] + rest[at + 2:]
    from tunelab.config import load_config

    config = load_config(args[1], parse_overrides(rest))
    from tunelab.data import prepare_template, preview
    from tunelab.model import load_tokenizer
    from tunelab.training.run import setup_logging

    setup_logging()
    tokenizer = load_tokenizer(config)
    print(preview(config, tokenizer, prepare_template(config, tokenizer), samples))
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
    "env": cmd_env,
    "version": cmd_version,
    "help": cmd_help,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
