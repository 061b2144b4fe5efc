"""Chat templates causalmm ships: LLaVA-1.5's, which the toy-world model's processor uses (and the tiny LLaVA
test models too)."""

from __future__ import annotations

__all__ = ["llava_chat_template"]


def llava_chat_template(eos_after_answer: bool = False) -> str:
    """LLaVA-1.5 / LLaVA-NeXT-vicuna style: "USER: <image>\n... ASSISTANT:" (images first, as in llava-hf).
    ``eos_after_answer`` closes each assistant turn with the eos token, for models trained to stop there."""
    return (
        "{% for message in messages %}"
        "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
        "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
        "{% else %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
        "{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' ' }}{% endfor %}"
        "{% endif %}"
        + ("{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}" if eos_after_answer else "")
        + "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )
