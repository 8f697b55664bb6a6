"""Browser front ends (gradio, the optional extra `webui`): `tunelab webchat`, a chat page for one model."""
