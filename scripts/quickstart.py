"""The quickstart: ask the embedded model who it is, fine-tune it with LoRA on tunelab's identity data, ask again.

    .venv/bin/python scripts/quickstart.py examples/quickstart.yaml [key=value ...]

(`bash scripts/quickstart.sh` sets up .venv and runs this.) Exits 1 when the trained model does not give its new
name, so the quickstart doubles as an end-to-end check.
"""

import json
import sys
import time
from pathlib import Path

QUESTION = "Who are you?"
NEW_NAME = "Kestrel"


def answer(model, tokenizer, question: str) -> str:
    """Greedy reply through the tokenizer's chat template (the one training uses)."""
    import torch

    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def fastest_precision() -> list[tuple[str, str]]:
    """bf16 where this CPU multiplies bfloat16 natively (2-4x float32's rate), float32 where bf16 would be slower;
    a GPU run, or a command line that names a precision, is left as it is."""
    import torch

    from tunelab.model.precision import cpu_bf16_speedup

    if torch.cuda.is_available() or any(key in arg for arg in sys.argv[2:] for key in ("bf16", "fp16")):
        return []
    speedup = cpu_bf16_speedup()
    if speedup >= 1.5:
        print(f"[quickstart] this CPU multiplies bfloat16 {speedup:.1f}x faster than float32: training with bf16=true")
        return [("bf16", "true")]
    print(f"[quickstart] bfloat16 is not faster than float32 on this CPU ({speedup:.1f}x): training in float32")
    return []


def main() -> int:
    start = time.time()
    from tunelab.cli import parse_overrides
    from tunelab.config import load_config

    overrides = parse_overrides(sys.argv[2:]) + fastest_precision()
    config = load_config(sys.argv[1], overrides)
    from peft import PeftModel

    import tunelab
    from tunelab.data import prepare_template
    from tunelab.model import load_model, load_tokenizer
    from tunelab.training.run import setup_logging

    setup_logging()
    tokenizer = load_tokenizer(config)
    prepare_template(config, tokenizer)
    base = load_model(config, tokenizer, trainable=False)
    before = answer(base, tokenizer, QUESTION)
    print(f"\n[quickstart] before training, {QUESTION!r} -> {before!r}\n", flush=True)

    metrics = tunelab.train(sys.argv[1], overrides)

    trained = PeftModel.from_pretrained(base, config.output_dir).eval()
    after = answer(trained, tokenizer, QUESTION)
    log = [json.loads(line) for line in Path(config.output_dir, "trainer_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    print(f"\n[quickstart] before training, {QUESTION!r} -> {before!r}")
    print(f"[quickstart] after training,  {QUESTION!r} -> {after!r}")
    print(f"[quickstart] loss {losses[0]:.3f} -> {losses[-1]:.3f} over {log[-1]['current_steps']} steps; "
          f"{metrics['train_tokens_per_second']:.0f} tokens/s; train {metrics['train_runtime']:.0f} s; "
          f"total {time.time() - start:.0f} s")
    print(f"[quickstart] outputs in {config.output_dir}: "
          + ", ".join(sorted(p.name for p in Path(config.output_dir).iterdir())))
    if NEW_NAME not in after or losses[-1] >= losses[0]:
        print(f"[quickstart] FAILED: expected the loss to fall and the answer to name {NEW_NAME}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
