"""Evaluation layer: how good a model's answers are, apart from how it was trained or is served.

- `tasks`: the questions of a multiple-choice benchmark (MMLU / C-Eval / CMMLU layout, local or from the hub);
- `multiple_choice`: `tunelab eval`, scoring those questions from next-token logits with its own forward passes;
- `text_metrics`: BLEU-4 and ROUGE of generated replies, which `do_predict` reports.

It sits between the model and training layers (it imports only config, data and model) so that training can score
its predictions with it. Importing the package loads nothing heavy.
"""
