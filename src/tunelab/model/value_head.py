"""A causal LM with a scalar head on its last hidden state: the reward model of `rm`, the critic of `ppo`.

    model = ValueHeadModel(causal_lm)                       # adds v_head: Linear(hidden_size, 1) in float32
    values = model(input_ids, attention_mask).values        # [batch, seq]: one score per position
    out = model(input_ids, attention_mask, return_logits=True)   # out.logits too (ppo needs both from one pass)
    model.save_pretrained(folder)     # the backbone as it saves itself (adapter or full weights) + the head
    model.load_value_head(folder)

The head is stored as LLaMA-Factory stores it, `value_head.safetensors` with `v_head.summary.weight` and
`v_head.summary.bias`, so a reward model trained by either tool scores in the other.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from tunelab.model.vision import is_vision_language

if TYPE_CHECKING:
    from transformers import PreTrainedModel

VALUE_HEAD_FILE = "value_head.safetensors"
_WEIGHT, _BIAS = "v_head.summary.weight", "v_head.summary.bias"


class ValueHeadOutput(NamedTuple):
    values: torch.Tensor
    logits: torch.Tensor | None


class ValueHeadModel(torch.nn.Module):
    """Wraps a causal LM (plain or peft) and adds a trainable linear head that maps each hidden state to a score.

    It answers what transformers' Trainer asks of a model (`config`, `num_parameters`, `accepts_loss_kwargs`,
    `_keys_to_ignore_on_save`) for its backbone, so a Trainer can train it like the causal LM itself.
    """

    # The forward returns scores, not a loss: the Trainer must not pass it loss arguments (num_items_in_batch), and
    # must itself average the loss over gradient accumulation steps.
    accepts_loss_kwargs = False

    def __init__(self, pretrained_model: "PreTrainedModel") -> None:
        super().__init__()
        self.pretrained_model = pretrained_model
        hidden_size = pretrained_model.config.get_text_config().hidden_size
        # Float32 whatever the backbone's dtype: scores feed losses and comparisons that half precision blurs.
        self.v_head = torch.nn.Linear(hidden_size, 1, dtype=torch.float32,
                                      device=pretrained_model.get_input_embeddings().weight.device)
        # A small start keeps the first rewards near 0, as a random full-size head would not.
        torch.nn.init.normal_(self.v_head.weight, std=1 / (hidden_size + 1))
        torch.nn.init.zeros_(self.v_head.bias)

    @property
    def config(self) -> Any:
        return self.pretrained_model.config

    @property
    def _keys_to_ignore_on_save(self) -> Any:
        # Read by the Trainer when a resumed checkpoint lacks keys (a tied lm_head is never saved).
        return self.pretrained_model._keys_to_ignore_on_save

    def num_parameters(self, **kwargs: Any) -> int:
        """The backbone's count (the head adds hidden_size + 1): the Trainer's `total_flos` estimate reads it."""
        return self.pretrained_model.num_parameters(**kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_logits: bool = False, **kwargs: Any) -> ValueHeadOutput:
        if return_logits:
            out = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                                        use_cache=False, **kwargs)
            hidden, logits = out.hidden_states[-1], out.logits
        else:
            # The model without its head: the vocabulary projection is the largest matrix product and scores do not
            # need it.
            out = self._backbone()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
            hidden, logits = out.last_hidden_state, None
        values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)
        return ValueHeadOutput(values=values, logits=logits)

    def _backbone(self) -> torch.nn.Module:
        """The model below the vocabulary head: the decoder of a causal LM; for a vision-language model the
        multimodal model, since its decoder alone would take image tokens for text (it ignores pixel_values)."""
        model = self.pretrained_model
        if not is_vision_language(model.config):
            return model.get_decoder()
        # peft injects its layers in place, so the transformers model under a PeftModel computes with the adapter.
        unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model
        return unwrapped.base_model

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        **kwargs: Any) -> None:
        """The backbone as it saves itself, plus value_head.safetensors.

        `state_dict` is this wrapper's whole state when the Trainer gathered it from shards (DeepSpeed ZeRO-3, FSDP),
        where the modules' own tensors are only pieces; it is split between the backbone and the head.
        """
        from safetensors.torch import save_file

        weight, bias = self.v_head.weight, self.v_head.bias
        if state_dict is not None:
            weight, bias = state_dict["v_head.weight"], state_dict["v_head.bias"]
            state_dict = {name.removeprefix("pretrained_model."): tensor for name, tensor in state_dict.items()
                          if name.startswith("pretrained_model.")}
        self.pretrained_model.save_pretrained(folder, state_dict=state_dict, **kwargs)
        state = {_WEIGHT: weight.detach().float().cpu().contiguous(), _BIAS: bias.detach().float().cpu().contiguous()}
        save_file(state, str(Path(folder) / VALUE_HEAD_FILE), metadata={"format": "pt"})

    def load_value_head(self, folder: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(folder) / VALUE_HEAD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {VALUE_HEAD_FILE}: it is not a reward model saved by the rm "
                                    f"stage")
        state = load_file(str(path))
        with torch.no_grad():
            self.v_head.weight.copy_(state[_WEIGHT])
            self.v_head.bias.copy_(state[_BIAS])


def has_value_head(folder: str | Path) -> bool:
    return (Path(folder) / VALUE_HEAD_FILE).is_file()


def last_token_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score of each sequence: its value at the last attended position (right or left padding alike)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask.bool()).argmax(dim=1)
    return values.gather(1, last.unsqueeze(1)).squeeze(1)
