"""Inference layer: one engine interface (Hugging Face or vLLM backend) that every front end uses (terminal chat,
OpenAI-compatible API, web chat, the Python `ChatModel`). Benchmarks (`tunelab eval`) live in `tunelab.eval`.

Imports nothing heavy at package import; the engines load torch and transformers when they are built.
"""
