"""Tiny random models with real BPE tokenizers, built in milliseconds, for tests and examples.

    .venv/bin/python -c "from tunelab.model import build_tiny_model; print(build_tiny_model('/tmp/tiny'))"

The weights are random (seeded), but everything around them is real: a byte-level BPE tokenizer trained on a few
English and Chinese paragraphs, ChatML special tokens and chat template, a config that `AutoModelForCausalLM` and
`AutoTokenizer` reload offline. Nothing is cached between calls: each call writes a fresh folder.
"""

from pathlib import Path

#: Special tokens in id order (they get ids 0..6, before any learned token).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                  "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer split. transformers rebuilds this exact pipeline for any qwen2-type checkpoint (it ignores
# the pipeline in tokenizer.json), so a tokenizer trained with anything else would encode differently after reload.
# The llama build uses the same pipeline, which keeps one code path.
_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

_CORPUS = """\
Fine-tuning adapts a pretrained language model to a new task with a small amount of labelled data. The model
reads a prompt, predicts the next token, and the loss measures how surprised it was by the correct answer.
Low-rank adaptation freezes the original weights and learns two thin matrices beside each linear layer, so the
optimizer only has to remember a few million numbers instead of billions.
Hello! How are you today? I am fine, thank you. What is the capital of France? The capital of France is Paris.
Please write a short poem about the sea. The sea is wide and the waves are blue; the wind sings softly all night.
Numbers such as 1, 2, 3, 42 and 2048 appear in code: for i in range(10): print(i * i).
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.
机器学习是人工智能的一个分支。我们用数据训练模型，让它学会回答问题。
你好！今天天气很好，我们一起去公园散步吧。请用中文回答下面的问题。
大语言模型可以写诗、翻译文章、总结新闻，也可以帮助程序员编写代码。
北京是中国的首都，上海是一个国际化的大城市。
"""


def build_tiny_model(out_dir: str | Path, arch: str = "llama") -> Path:
    """Save a random tiny causal LM (`arch` "llama" or "qwen2") and its tokenizer to `out_dir`; return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    architectures = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if arch not in architectures:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of: {', '.join(architectures)}")
    config_class, model_class = architectures[arch]

    out = Path(out_dir)
    tokenizer = _build_tokenizer()
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        # About 1/sqrt(hidden). With transformers' default of 0.02 a 64-wide model's logits are nearly flat, and
        # LoRA (which trains neither the embeddings nor the head) barely moves its loss, unlike on a real model.
        initializer_range=0.1,
    )
    # Fork the RNG so building a model does not change the caller's random stream.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_class(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _build_tokenizer():
    """A byte-level BPE tokenizer trained on `_CORPUS`, wrapped for transformers with ChatML tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    # Like Qwen: no BOS token, <|im_end|> ends a turn, <|endoftext|> pads. This generic class saves itself as
    # `TokenizersBackend`, which AutoTokenizer reloads from tokenizer.json as is; `LlamaTokenizer` (what a llama
    # model_type would otherwise pick) rebuilds a Metaspace pipeline and would encode differently.
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        chat_template=CHATML_TEMPLATE,
    )
