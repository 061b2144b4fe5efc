"""VLind-Bench's prompts and answer parsing, as its official evaluation scripts word them
(``klee972/VLind-Bench``: ``eval/gpt4o_eval.py``, ``eval/instructblip_eval.py``); used by the benchmark and by the
toy world, which asks its statements the same way."""

from __future__ import annotations

__all__ = ["PROMPTS", "infer_true_or_false", "prompt_gpt4o", "prompt_instructblip"]

_IMAGE_Q = "Based on the image, is the given statement true or false?"
_CONTEXT_Q = "Based on the context, is the given statement true or false?"
_TF = "Only respond in True or False."
_FORGET = "Forget real-world common sense and just follow the information provided in the"


def prompt_gpt4o(test: str, statement: str, context: str) -> str:
    """The prompt of ``eval/gpt4o_eval.py`` for ``test`` (ck, vp, cb, lp)."""
    if test == "ck":
        return f"Statement: {statement}\nBased on the common sense, is the given statement true or false? {_TF}"
    if test == "vp":
        return f"Statement: {statement}\n{_IMAGE_Q} {_TF}"
    if test == "cb":
        return f"Context: {context}\nStatement: {statement}\n{_CONTEXT_Q} {_FORGET} context. {_TF}"
    return f"Statement: {statement}\n{_IMAGE_Q} {_FORGET} image. {_TF}"


def prompt_instructblip(test: str, statement: str, context: str) -> str:
    """The prompt of ``eval/instructblip_eval.py`` for ``test`` (ck, vp, cb, lp)."""
    if test == "ck":
        return f"{_TF}\nStatement: {statement}\nBased on common sense, is the given statement true or false?"
    if test == "cb":
        return f"{_TF}\nContext: {context}\nStatement: {statement}\n{_CONTEXT_Q}"
    return f"{_TF}\nStatement: {statement}\n{_IMAGE_Q}"


#: prompt set name -> builder ``(test, statement, context) -> prompt``
PROMPTS = {"gpt4o": prompt_gpt4o, "instructblip": prompt_instructblip}


def infer_true_or_false(text: str) -> str:
    """``True``, ``False`` or ``NA`` by the official rule (first exact word ``true``/``false`` after normalising)."""
    for word in text.lower().replace("\n", " ").replace(",", "").replace(".", "").split(" "):
        if word == "true":
            return "True"
        if word == "false":
            return "False"
    return "NA"
