"""The template table: LLaMA-Factory's template names, each a `ChatTemplate` row.

The markup of every row is LLaMA-Factory's, so data trained there renders the same here, with four deliberate
exceptions, each pinned by a parity test against the model's own tokenizer: `qwen3` (and `deepseekr1`) render a
reasoning reply exactly as Qwen3's own chat template does (earlier replies lose their reasoning, the tool list follows
the system prompt without a blank system), `llama3` writes tools as Meta's template does, `llama3` and `mistral` trim
the whitespace around messages where Meta's and Mistral's templates do (`trim`), and `smollm2`'s default system
prompt is the model's own (without LLaMA-Factory's trailing period). Adding a family is a row here plus a test (see
this package's `__init__`).

`efficient_eos` rows end a reply with no markup of its own (the next turn's markup ends it), so the conversation's
last reply is followed by the eos token, which the model learns to stop at.
"""

from dataclasses import replace

from tunelab.data.template.chat import ChatTemplate

_THINK = ("<think>\n", "\n</think>\n\n")
_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_INTERN_SYSTEM = ("You are an AI assistant whose name is InternLM (书生·浦语).\n"
                  "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI "
                  "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
                  "- InternLM (书生·浦语) can understand and communicate fluently in the language "
                  "chosen by the user such as English and 中文.")

CHATML = ChatTemplate(
    name="chatml",
    system="<|im_start|>system\n{{content}}<|im_end|>\n",
    user="<|im_start|>user\n{{content}}<|im_end|>\n",
    assistant_header="<|im_start|>assistant\n",
    assistant="{{content}}<|im_end|>\n",
    observation="<|im_start|>tool\n{{content}}<|im_end|>\n",
    stop_words=("<|im_end|>", "<|im_start|>"),
    replace_eos=True,
    markers=("<|im_start|>", "<|im_end|>"),
)
QWEN = replace(
    CHATML, name="qwen", default_system=_QWEN_SYSTEM, tool_format="qwen", stop_words=("<|im_end|>",),
    observation_open="<|im_start|>user", observation="\n<tool_response>\n{{content}}\n</tool_response>",
    observation_close="<|im_end|>\n",
)
LLAMA3 = ChatTemplate(
    name="llama3",
    prefix="{{bos_token}}",
    system="<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>",
    assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant="{{content}}<|eot_id|>",
    observation="<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>",
    tool_format="llama3",
    stop_words=("<|eot_id|>", "<|eom_id|>"),
    replace_eos=True,
    markers=("<|start_header_id|>", "<|end_header_id|>"),
    trim=("system", "user", "assistant"),  # Meta's template writes every message `| trim`
)
LLAMA2 = ChatTemplate(
    name="llama2",
    user="{{bos_token}}[INST] {{content}} [/INST]",
    system="<<SYS>>\n{{content}}\n<</SYS>>\n\n",
    system_in_user=True,
)
MISTRAL = ChatTemplate(
    name="mistral",
    prefix="{{bos_token}}",
    user="[INST] {{content}}[/INST]",
    assistant=" {{content}}{{eos_token}}",
    system="{{content}}\n\n",
    system_in_user=True,
    function="[TOOL_CALLS] {{content}}{{eos_token}}",
    observation='[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]',
    tool_format="mistral",
    trim=("assistant",),  # Mistral v0.3's template trims replies only
)
MINISTRAL = replace(
    MISTRAL, name="ministral", user="[INST]{{content}}[/INST]", assistant="{{content}}{{eos_token}}",
    function="[TOOL_CALLS]{{content}}{{eos_token}}",
    observation='[TOOL_RESULTS]{"content": {{content}}}[/TOOL_RESULTS]',
    trim=(),  # no official template here to check trimming against: LLaMA-Factory's format, as is
)
GEMMA = ChatTemplate(
    name="gemma",
    prefix="{{bos_token}}",
    user="<start_of_turn>user\n{{content}}<end_of_turn>\n",
    assistant_header="<start_of_turn>model\n",
    assistant="{{content}}<end_of_turn>\n",
    system="{{content}}\n\n",
    system_in_user=True,
    observation="<start_of_turn>tool\n{{content}}<end_of_turn>\n",
    stop_words=("<end_of_turn>",),
    replace_eos=True,
    markers=("<start_of_turn>", "<end_of_turn>"),
)
GLM4 = ChatTemplate(
    name="glm4",
    prefix="[gMASK]<sop>",
    system="<|system|>\n{{content}}",
    user="<|user|>\n{{content}}",
    assistant_header="<|assistant|>",
    assistant="\n{{content}}",
    function="{{content}}",
    observation="<|observation|>\n{{content}}",
    tool_format="glm4",
    stop_words=("<|user|>", "<|observation|>"),
    efficient_eos=True,
    markers=("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
)
DEEPSEEK3 = ChatTemplate(
    name="deepseek3",
    prefix="{{bos_token}}",
    user="<｜User｜>{{content}}",
    assistant_header="<｜Assistant｜>",
    markers=("<｜User｜>", "<｜Assistant｜>"),
)
PHI = ChatTemplate(
    name="phi",
    system="<|system|>\n{{content}}<|end|>\n",
    user="<|user|>\n{{content}}<|end|>\n",
    assistant_header="<|assistant|>\n",
    assistant="{{content}}<|end|>\n",
    stop_words=("<|end|>",),
    replace_eos=True,
    markers=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
)

#: name -> template. Every family in ../shared/tokenizers has its row, and so does every name the seeds use.
TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (
    # No markup: the prompt as is, the reply followed by eos (so a model trained with it learns to stop).
    ChatTemplate(name="empty"),
    ChatTemplate(name="default", user="Human: {{content}}{{eos_token}}\n", assistant_header="Assistant:",
                 assistant="{{content}}{{eos_token}}\n", system="System: {{content}}{{eos_token}}\n"),
    ChatTemplate(name="alpaca", user="### Instruction:\n{{content}}\n\n", assistant_header="### Response:\n",
                 assistant="{{content}}{{eos_token}}\n\n",
                 default_system="Below is an instruction that describes a task. Write a response that appropriately "
                                "completes the request.\n\n"),
    ChatTemplate(name="vicuna", user="USER: {{content}} ", assistant_header="ASSISTANT:",
                 default_system=_VICUNA_SYSTEM),
    ChatTemplate(name="zephyr", user="<|user|>\n{{content}}{{eos_token}}", assistant_header="<|assistant|>\n",
                 system="<|system|>\n{{content}}{{eos_token}}", default_system="You are Zephyr, a helpful assistant."),
    CHATML,
    QWEN,
    # An image or a video as Qwen2-VL's own chat template writes it; its processor then repeats the pad token once
    # per vision token. Qwen2.5-VL's tokenizer has the same template.
    replace(QWEN, name="qwen2_vl", default_system="You are a helpful assistant.",
            image_markup="<|vision_start|><|image_pad|><|vision_end|>",
            video_markup="<|vision_start|><|video_pad|><|vision_end|>"),
    replace(QWEN, name="qwen3", default_system="", thought=_THINK),
    replace(QWEN, name="qwen3_nothink", default_system=""),
    replace(CHATML, name="yi", stop_words=("<|im_end|>",), observation=""),
    replace(CHATML, name="smollm", stop_words=("<|im_end|>",), replace_eos=False, observation=""),
    replace(CHATML, name="smollm2", stop_words=("<|im_end|>",), replace_eos=False, observation="",
            default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    replace(CHATML, name="intern2", prefix="{{bos_token}}", stop_words=("<|im_end|>",), replace_eos=False,
            default_system=_INTERN_SYSTEM, observation=""),
    replace(CHATML, name="cpm3", prefix="{{bos_token}}", stop_words=("<|im_end|>",), replace_eos=False),
    LLAMA3,
    LLAMA2,
    replace(LLAMA2, name="llama2_zh", default_system="You are a helpful assistant. 你是一个乐于助人的助手。"),
    MISTRAL,
    MINISTRAL,
    replace(MINISTRAL, name="mistral_small", system="[SYSTEM_PROMPT]{{content}}[/SYSTEM_PROMPT]",
            system_in_user=False),
    GEMMA,
    replace(GEMMA, name="gemma2", stop_words=("<eos>", "<end_of_turn>"), replace_eos=False, efficient_eos=True),
    replace(GEMMA, name="gemma3"),
    PHI,
    ChatTemplate(name="phi4", system="<|im_start|>system<|im_sep|>{{content}}<|im_end|>",
                 user="<|im_start|>user<|im_sep|>{{content}}<|im_end|>",
                 assistant_header="<|im_start|>assistant<|im_sep|>", assistant="{{content}}<|im_end|>",
                 stop_words=("<|im_end|>",), replace_eos=True, markers=("<|im_start|>", "<|im_sep|>", "<|im_end|>")),
    ChatTemplate(name="baichuan2", user="<reserved_106>{{content}}", assistant_header="<reserved_107>",
                 assistant="{{content}}", efficient_eos=True, markers=("<reserved_106>", "<reserved_107>")),
    replace(GLM4, name="chatglm3", prefix="[gMASK]sop", markers=("[gMASK]", "sop", "<|system|>", "<|user|>",
                                                                  "<|assistant|>", "<|observation|>")),
    GLM4,
    ChatTemplate(name="deepseek", prefix="{{bos_token}}", user="User: {{content}}\n\n", assistant_header="Assistant:",
                 system="{{content}}\n\n"),
    DEEPSEEK3,
    replace(DEEPSEEK3, name="deepseekr1", thought=_THINK),
    ChatTemplate(name="cohere", prefix="{{bos_token}}",
                 user="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|>",
                 assistant_header="<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
                 system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|>",
                 markers=("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
                          "<|SYSTEM_TOKEN|>")),
    ChatTemplate(name="falcon", user="User: {{content}}\n", assistant_header="Falcon:", assistant="{{content}}\n",
                 efficient_eos=True),
    ChatTemplate(name="olmo", prefix="{{eos_token}}", user="<|user|>\n{{content}}", assistant_header="<|assistant|>\n"),
    ChatTemplate(name="openchat", prefix="{{bos_token}}", user="GPT4 Correct User: {{content}}{{eos_token}}",
                 assistant_header="GPT4 Correct Assistant:"),
    replace(PHI, name="starchat", assistant_header="<|assistant|>", replace_eos=False),
    ChatTemplate(name="granite3", system="<|start_of_role|>system<|end_of_role|>{{content}}<|end_of_text|>\n",
                 user="<|start_of_role|>user<|end_of_role|>{{content}}<|end_of_text|>\n",
                 assistant_header="<|start_of_role|>assistant<|end_of_role|>", assistant="{{content}}<|end_of_text|>\n",
                 markers=("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>")),
    ChatTemplate(name="exaone", system="[|system|]{{content}}[|endofturn|]\n", user="[|user|]{{content}}\n",
                 assistant_header="[|assistant|]", assistant="{{content}}{{eos_token}}\n"),
    ChatTemplate(name="solar", system="### System:\n{{content}}\n\n", user="### User:\n{{content}}\n\n",
                 assistant_header="### Assistant:\n", assistant="{{content}}", efficient_eos=True),
)}
