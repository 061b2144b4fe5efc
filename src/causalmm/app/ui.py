"""The page of ``causalmm app`` (gradio): an image, a question, the methods to tick, each with its settings;
the answers side by side with their time, and for one method the per-token table and the attention figure.

Every handler turns :class:`~.session.AppError` into a message in the page, so a bad input never ends the
server nor shows a traceback.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .session import AppError, Session, default_settings

__all__ = ["build_app", "examples"]

#: the question the page opens with (the toy world's POPE question)
QUESTION = "Is there a cat in the image? Please answer this question with one word."


def examples(n: int = 6, world: str = "default") -> list[str]:
    """``n`` images of the shipped toy ``world``'s test split, written once to a temporary folder (for the example
    picker)."""
    from ..toyworld import eval_scenes, render
    from ..toyworld.worlds import get_world

    config = get_world(world).config
    folder = Path(tempfile.mkdtemp(prefix="causalmm-app-examples-"))
    paths = []
    for i, scene in enumerate(eval_scenes(config, "test", n)):
        path = folder / f"test-{i}.png"
        render(config, scene).save(path)
        paths.append(str(path))
    return paths


def build_app(session: Session, *, example_images: list[str] | None = None) -> Any:
    """The gradio Blocks of the app on ``session``'s model."""
    import gradio as gr

    from ..methods import get_method, method_names

    names = method_names()
    with gr.Blocks(title="causalmm") as demo:
        gr.Markdown(
            f"# causalmm\nModel: {session.model_name}. Drop an image (or pick an example), ask, tick methods; "
            "each answer is `CausalMM.generate` with that method's settings and the seed."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="image", elem_id="image", height=260)
                if example_images:
                    gr.Examples(examples=[[p] for p in example_images], inputs=[image], label="toy-world test images")
                question = gr.Textbox(value=QUESTION, label="question", elem_id="question", lines=2)
                methods = gr.CheckboxGroup(names, value=["regular", "causalmm"], label="methods", elem_id="methods")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                    max_new = gr.Number(value=16, precision=0, label="max new tokens", elem_id="max-new-tokens")
                with gr.Accordion("settings of each method (NAME=VALUE per line)", open=False):
                    boxes = {
                        m: gr.Textbox(
                            value=default_settings(m), label=f"{m}: {get_method(m).summary}", lines=2,
                            elem_id=f"settings-{m}",
                        )  # fmt: skip
                        for m in names
                        if get_method(m).params
                    }
                ask = gr.Button("Answer", variant="primary", elem_id="ask")
            with gr.Column(scale=2):
                message = gr.Markdown("", elem_id="message")
                answers = gr.Dataframe(
                    headers=["method", "answer", "seconds", "settings"], label="answers", elem_id="answers",
                    interactive=False, wrap=True,
                )  # fmt: skip
                with gr.Row():
                    chosen = gr.Dropdown(names, value="causalmm", label="explain this method", elem_id="explain-method")
                    why = gr.Button("Explain", elem_id="explain")
                table = gr.Dataframe(label="per token: top candidates of each branch", elem_id="explain-table",
                                     interactive=False, wrap=True)  # fmt: skip
                figure = gr.Image(label="attention (factual and counterfactual maps)", elem_id="figure")

        setting_inputs = list(boxes.values())

        def settings_of(values: list[str]) -> dict[str, str]:
            return dict(zip(boxes, values, strict=True))

        def on_ask(img, q, ticked, s, n, *values):
            try:
                rows = session.answer(img, q, list(ticked or []), settings_of(list(values)), seed=int(s or 0),
                                      max_new_tokens=int(n or 16))  # fmt: skip
            except AppError as err:
                return f"**error:** {err}", gr.update(value=None)
            data = [[a.method, a.text, round(a.seconds, 3), a.settings] for a in rows]
            return "", gr.update(value=data)

        def on_explain(img, q, method, s, n, *values):
            try:
                head, rows, path = session.explain(img, q, method, settings_of(list(values)).get(method, ""),
                                                   seed=int(s or 0), max_new_tokens=int(n or 16))  # fmt: skip
            except AppError as err:
                return f"**error:** {err}", gr.update(value=None), gr.update(value=None)
            return "", gr.update(value=rows, headers=head), gr.update(value=str(path))

        common = [image, question]
        ask.click(on_ask, [*common, methods, seed, max_new, *setting_inputs], [message, answers])
        why.click(on_explain, [*common, chosen, seed, max_new, *setting_inputs], [message, table, figure])
    return demo
