"""The page of ``causalmm app`` (gradio): an image, a question, the methods to tick, each with its settings;
the answers side by side with their time, and for one method the per-token table and the attention figure.

The image box hands causalmm the uploaded file itself (``gr.File``), never an image gradio decoded and wrote
again, so the page reads it as :func:`causalmm.images.load_image` and ``CausalMM.generate`` do (16-bit, EXIF
rotation, transparency, the pixel limit), and an unreadable file is causalmm's message; a preview shows the
image as the model sees it. Every handler turns :class:`~.session.AppError` into a message in the page and any
other exception (a bug) into a message too, its traceback in the server's log, so nothing ends the server or
shows a traceback in the page. :func:`check_host` and :func:`check_port` let the CLI refuse an address it
cannot serve on before gradio starts.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from .session import AppError, Session, default_settings

__all__ = ["build_app", "check_host", "check_port", "examples"]

#: the question the page opens with (the toy world's POPE question)
QUESTION = "Is there a cat in the image? Please answer this question with one word."

#: the longer side of the preview, in pixels (the model gets the full image; a browser needs no more)
PREVIEW_SIDE = 1024

#: a host name: dot-separated labels of letters, digits and inner hyphens
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _family(host: str) -> socket.AddressFamily:
    """The address family the server binds ``host`` with: IPv6 where it has a colon, as uvicorn decides."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_host(host: str) -> str | None:
    """Why the app cannot be served on ``host`` (one line naming ``--host`` and the fix), ``None`` where it is
    one of this machine's addresses, or a name that resolves to one. What cannot be a host is refused without
    a network query."""
    example = "e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every network)"
    if not host.strip():
        return f"--host is empty: give the address to serve on, {example}"
    if host.startswith("[") and host.endswith("]"):
        return f"--host {host}: write the address without brackets, e.g. --host {host[1:-1]}"
    numeric = re.fullmatch(r"[0-9.]+", host) is not None  # inet_aton forms such as 127.1 are addresses too
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not numeric and not _HOST_NAME.fullmatch(host):
            return f"--host {host!r} is not an address or a host name; give one, {example}"
        flags = socket.AI_NUMERICHOST if numeric else 0
        try:
            socket.getaddrinfo(host, None, _family(host), socket.SOCK_STREAM, 0, flags)
        except (OSError, UnicodeError):
            what = "is not an IPv4 address (four numbers from 0 to 255)" if numeric else "does not resolve"
            return f"--host {host} {what}; give an address, {example}"
    if (err := _bind_error(host, 0)) is not None and err.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine, so the app cannot serve on it; give one, {example}"
    return None


def _free_port_after(host: str, port: int, tries: int = 20) -> int | None:
    """The first port after ``port`` that ``host`` can serve on (a suggestion), ``None`` if none of ``tries``."""
    for candidate in range(port + 1, min(port + tries, 65535) + 1):
        if _bind_error(host, candidate) is None:
            return candidate
    return None


def _bind_error(host: str, port: int) -> OSError | None:
    """What binding ``host:port`` raises, ``None`` where it binds; as uvicorn binds (``SO_REUSEADDR``, so a
    port a stopped server left in TIME_WAIT counts as free, and one a running server holds does not)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            return err
    return None


def check_port(host: str, port: int) -> str | None:
    """Why the app cannot be served on ``host:port`` (one line naming ``--port`` and the fix), ``None`` where
    the port is in range and free; ``host`` passed :func:`check_host`. (Another program can still take the port
    while the model loads; gradio says so then.)"""
    if not 1 <= port <= 65535:
        return f"--port {port} must be between 1 and 65535"
    err = _bind_error(host, port)
    if err is None:
        return None
    if err.errno == errno.EADDRINUSE:
        free = _free_port_after(host, port)
        fix = f"pick another, e.g. --port {free}" if free else "pick another port"
        return f"--port {port} is in use on {host} (another program, or another causalmm app, serves there); {fix}"
    if err.errno == errno.EACCES:
        return f"--port {port}: permission denied (ports below 1024 need administrator rights); use e.g. --port 7860"
    return f"cannot serve on --host {host} --port {port}: {err.strerror or err}"


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


def _markdown(text: str) -> str:
    """``text`` shown as it is by a Markdown box (a message may hold ``*``, ``_``, ``<image>``, brackets)."""
    return re.sub(r"([\\`*_{}\[\]<>#|~])", r"\\\1", text)


def _error(err: AppError) -> str:
    return f"**error:** {_markdown(str(err))}"


def _bug(what: str, err: Exception) -> str:
    """The page's message for an exception that is not the user's (a bug): its traceback goes to the server's
    log, and the page keeps serving."""
    traceback.print_exception(err, file=sys.stderr)
    text = f"{what} failed on a bug in causalmm ({type(err).__name__}: {err}); the traceback is in the server's log"
    return f"**error:** {_markdown(text)}"


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
                # the file itself, not gr.Image: that one decodes and writes the upload again with PIL first
                image = gr.File(label="image file", type="filepath", elem_id="image")
                preview = gr.Image(
                    label="the image as the model sees it", elem_id="preview", interactive=False, format="png",
                    height=260,
                )  # fmt: skip
                if example_images:
                    gr.Examples(examples=[[p] for p in example_images], inputs=[image], label="toy-world test images")
                question = gr.Textbox(value=QUESTION, label="question", elem_id="question", lines=2)
                methods = gr.CheckboxGroup(names, value=["regular", "causalmm"], label="methods", elem_id="methods")
                with gr.Row():
                    # precision=None: a box is checked as typed (gradio would round 2.5 to 2 before we see it)
                    seed = gr.Number(value=0, precision=None, label="seed", elem_id="seed")
                    max_new = gr.Number(value=16, precision=None, label="max new tokens", elem_id="max-new-tokens")
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

        def settings_of(values: tuple[str, ...]) -> dict[str, str]:
            return dict(zip(boxes, values, strict=True))

        def on_image(upload):
            if upload is None:  # the box was cleared
                return "", None
            try:
                seen = session.image(upload)
            except AppError as err:
                return _error(err), None
            except Exception as err:  # a bug: in the server's log, and the page goes on
                return _bug("reading the image", err), None
            if max(seen.size) > PREVIEW_SIDE:
                seen.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
            return "", seen

        def on_ask(upload, q, ticked, s, n, *values):
            try:
                rows = session.answer(upload, q, list(ticked or []), settings_of(values), seed=s, max_new_tokens=n)
            except AppError as err:
                return _error(err), gr.update(value=None)
            except Exception as err:
                return _bug("answering", err), gr.update(value=None)
            data = [[a.method, a.text, round(a.seconds, 3), a.settings] for a in rows]
            return "", gr.update(value=data)

        def on_explain(upload, q, method, s, n, *values):
            try:
                head, rows, path = session.explain(upload, q, method, settings_of(values).get(method, ""), seed=s,
                                                   max_new_tokens=n)  # fmt: skip
            except AppError as err:
                return _error(err), gr.update(value=None), gr.update(value=None)
            except Exception as err:
                return _bug("explaining", err), gr.update(value=None), gr.update(value=None)
            return "", gr.update(value=rows, headers=head), gr.update(value=str(path))

        common = [image, question]
        image.change(on_image, [image], [message, preview])
        ask.click(on_ask, [*common, methods, seed, max_new, *setting_inputs], [message, answers])
        why.click(on_explain, [*common, chosen, seed, max_new, *setting_inputs], [message, table, figure])
    return demo
