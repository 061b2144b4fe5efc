"""``causalmm app``: the page's logic on the shipped toy-world model (answers = ``CausalMM.generate``, bad input
= a message), and the page itself driven in headless Chromium as a user drives it."""

import os
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib

import numpy as np
import pytest
from PIL import Image

from causalmm import CausalMM, CausalMMConfig
from causalmm.app import AppError, Session, default_settings, parse_settings
from causalmm.methods import method_names
from causalmm.toyworld.model import shipped_model_path

QUESTION = "Is there a cat in the image? Please answer this question with one word."
#: the question whose answer on the `uploads` scene changes when the page reads other pixels than the file's
CUP = "Is there a cup in the image? Please answer this question with one word."


@pytest.fixture(scope="module")
def session():
    return Session(str(shipped_model_path()))


@pytest.fixture(scope="module")
def toy_image(tmp_path_factory):
    from causalmm.toyworld import WorldConfig, eval_scenes, render

    config = WorldConfig()
    path = tmp_path_factory.mktemp("app") / "scene.png"
    render(config, eval_scenes(config, "test", 1)[0]).save(path)
    return path


def test_default_settings_are_the_methods_defaults():
    for name in method_names():
        config = parse_settings(name, default_settings(name))
        assert config == CausalMMConfig(method=name), name
    config = parse_settings("causalmm", "mode=language gamma=2 language_cf=uniform", seed=3)
    assert (config.mode, config.gamma, config.language_cf, config.seed) == ("language", 2.0, "uniform", 3)
    assert parse_settings("pai", "alpha=0.5").param("alpha") == 0.5


@pytest.mark.parametrize(
    "method, text, words",
    [
        ("causalmm", "gamma=-1", "gamma=-1.0 must be"),
        ("causalmm", "gamma=lots", "must be a number"),
        ("vcd", "colour=red", "vcd has no setting 'colour'"),
        ("icd", "gamma", "write NAME=VALUE"),
        ("nope", "", "unknown method 'nope'"),
        ("causalmm", "legacy=maybe", "true or false"),
    ],
)
def test_bad_settings_are_one_message(method, text, words):
    with pytest.raises(AppError, match=words):
        parse_settings(method, text)


def test_answers_are_generate_with_the_same_settings_and_seed(session, toy_image):
    settings = {"causalmm": "mode=language gamma=1.5", "vcd": default_settings("vcd")}
    answers = session.answer(toy_image, QUESTION, ["regular", "causalmm", "vcd"], settings, seed=4, max_new_tokens=4)
    cm = CausalMM.from_pretrained(str(shipped_model_path()))
    for answer in answers:
        config = parse_settings(answer.method, settings.get(answer.method, ""), seed=4)
        expected = cm.with_config(config).generate(toy_image, QUESTION, max_new_tokens=4).text
        assert answer.text == expected and answer.seconds > 0
    assert [a.method for a in answers] == ["regular", "causalmm", "vcd"]
    assert "mode=language" in answers[1].settings and "gamma=1.5" in answers[1].settings


def test_explain_gives_the_token_table_and_the_figure(session, toy_image):
    head, rows, figure = session.explain(toy_image, QUESTION, "causalmm", "mode=language", max_new_tokens=2)
    assert head[:3] == ["#", "token", "factual"] and "combined" in head and len(rows) >= 1
    assert all(len(r) == len(head) for r in rows)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_a_message(session, toy_image, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    cases = [
        ((None, QUESTION, ["regular"]), "no image"),
        ((toy_image, "  ", ["regular"]), "question is empty"),
        ((broken, QUESTION, ["regular"]), "cannot be read"),
        ((toy_image, QUESTION, []), "no method ticked"),
    ]
    for args, words in cases:
        with pytest.raises(AppError, match=words):
            session.answer(*args, {})
    with pytest.raises(AppError, match="max new tokens 0 is out of range: give a whole number from 1 to 512"):
        session.answer(toy_image, QUESTION, ["regular"], {}, max_new_tokens=0)
    # a setting this model cannot take (its LLM has 4 layers) is a message in both tabs, not a traceback
    with pytest.raises(AppError, match="sid: layer=9 is out of range"):
        session.answer(toy_image, QUESTION, ["sid"], {"sid": "layer=9"})
    with pytest.raises(AppError, match="sid: layer=9 is out of range"):
        session.explain(toy_image, QUESTION, "sid", "layer=9")


def _header_only_png(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none: a decompression bomb as a reader sees it
    before decoding (PIL refuses it on opening)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    """Files that gradio's image box decoded and wrote again as other pixels before causalmm saw them: a 16-bit
    grey scene (clipped to white), a fully transparent RGBA scene and a palette scene with a transparent colour
    (their hidden colours shown), and a scene stored on its side with an EXIF rotation. The scene has a cup, and
    the toy model answers `CUP` otherwise on those other pixels."""
    from causalmm.toyworld import WorldConfig, eval_scenes, render

    config = WorldConfig()
    scene = render(config, eval_scenes(config, "test", 6)[4])
    rgb = np.asarray(scene)
    folder = tmp_path_factory.mktemp("uploads")
    Image.fromarray(np.asarray(scene.convert("L")).astype(np.uint16) * 257).save(folder / "grey16.png")
    Image.fromarray(np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)]), "RGBA").save(folder / "transparent.png")
    scene.quantize(16).save(folder / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show": the file holds the scene turned the other way
    scene.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.png", exif=exif)
    return {p.stem: p for p in sorted(folder.iterdir())}


def test_the_uploads_are_what_their_names_say(uploads):
    modes = {name: Image.open(path).mode for name, path in uploads.items()}
    assert modes == {"grey16": "I;16", "palette": "P", "rotated": "RGB", "transparent": "RGBA"}
    assert Image.open(uploads["rotated"]).getexif()[0x0112] == 6


@pytest.mark.parametrize("name", ["grey16", "transparent", "palette", "rotated"])
def test_the_session_reads_an_upload_as_generate_reads_the_file(session, uploads, name):
    """As a path or as the file's bytes, the session answers what ``CausalMM.generate`` answers on the file, and
    its image is the loader's, pixel for pixel."""
    from causalmm.images import load_image

    path = uploads[name]
    expected = {
        m: session.cm.with_config(parse_settings(m, "")).generate(path, CUP, max_new_tokens=4).text
        for m in ("regular", "causalmm")
    }
    for given in (path, str(path), path.read_bytes()):
        answers = session.answer(given, CUP, ["regular", "causalmm"], {}, max_new_tokens=4)
        assert {a.method: a.text for a in answers} == expected
        assert np.array_equal(np.asarray(session.image(given)), np.asarray(load_image(path)))


def test_an_unreadable_or_huge_file_is_the_loaders_message(session, tmp_path):
    """The project's own messages, naming the file by its name (not the server's copy of it) and the fix."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    huge = tmp_path / "huge.png"
    huge.write_bytes(_header_only_png(30000, 30000))
    cases = [
        (broken, "the image cannot be read: cannot read image broken.png: not an image file PIL can open"),
        (huge, "the image cannot be read: image huge.png has 900000000 pixels, more than the limit of"),
        (huge.read_bytes(), "the image cannot be read: image bytes (45 bytes) has 900000000 pixels"),
    ]
    for given, words in cases:
        with pytest.raises(AppError, match=re.escape(words)) as caught:
            session.answer(given, QUESTION, ["regular"], {})
        assert str(tmp_path) not in str(caught.value)
    with pytest.raises(AppError, match="CAUSALMM_MAX_IMAGE_PIXELS=0"):
        session.image(huge)


@pytest.mark.parametrize(
    "value, words",
    [
        (0, "max new tokens 0 is out of range: give a whole number from 1 to 512"),
        (-3, "max new tokens -3 is out of range"),
        (513, "max new tokens 513 is out of range"),
        (2.5, "max new tokens 2.5 is not a whole number: give one from 1 to 512"),
        (float("nan"), "max new tokens nan is not a whole number"),
        (True, "max new tokens True is not a whole number"),
        (None, "max new tokens is empty: give a whole number from 1 to 512"),
    ],
)
def test_the_max_new_tokens_box_is_checked_never_replaced(session, toy_image, value, words):
    with pytest.raises(AppError, match=re.escape(words)):
        session.answer(toy_image, QUESTION, ["regular"], {}, max_new_tokens=value)
    with pytest.raises(AppError, match=re.escape(words)):
        session.explain(toy_image, QUESTION, "regular", "", max_new_tokens=value)


def test_whole_numbers_from_a_box_are_taken_and_others_refused(session, toy_image):
    """A number box gives floats: 4.0 is 4 tokens (the same answer as 4); a seed of 1.5 is refused, not rounded."""
    as_int = session.answer(toy_image, QUESTION, ["causalmm"], {}, seed=2, max_new_tokens=4)
    as_float = session.answer(toy_image, QUESTION, ["causalmm"], {}, seed=2.0, max_new_tokens=4.0)
    assert as_float[0].text == as_int[0].text
    with pytest.raises(AppError, match=re.escape("seed 1.5 is not a whole number")):
        session.answer(toy_image, QUESTION, ["regular"], {}, seed=1.5)


@pytest.fixture
def brittle():
    """A method registered as any is (``causalmm.methods.register``) whose rule scales the factual scores by
    ``scale`` and back: ``scale=0`` divides by zero in Python, ``scale=1e39`` overflows float32 into NaN. The
    shipped methods' settings are bounded so that theirs do not; this one stands for a method whose arithmetic
    breaks down anyway, run by the real engine. A negative ``scale`` stands for a bug (an AttributeError)."""
    from causalmm.methods import METHODS, Branch, Method, Param, register

    @register
    class Brittle(Method):
        name = "brittle"
        summary = "the factual scores times scale, then divided by it"
        reference = "tests/test_app.py"
        params = (Param("scale", 1.0, "1 leaves the scores as they are"),)

        def branches(self, config):
            return (Branch("text", prompt="text"),)  # a branch, so that the engine calls combine

        def combine(self, factual, counterfactuals, config, step):
            scale = config.param("scale")
            if scale < 0:
                return factual.scaled(scale)  # no such method: a bug
            return factual * scale * (1.0 / scale)

    yield "brittle"
    del METHODS["brittle"]


def test_a_method_whose_arithmetic_breaks_down_is_a_message_naming_it_and_its_settings(
    session, toy_image, brittle, capsys
):
    """The page names the method, its settings and the error, not a traceback; the server's log keeps the
    traceback (a bug can raise the same errors). Scores that became NaN are a message in explain too, not a table
    of NaN."""
    ok = session.answer(toy_image, QUESTION, ["regular", brittle], {brittle: "scale=2"}, max_new_tokens=2)
    assert ok[0].text == ok[1].text and ok[1].settings == "scale=2.0"  # the rule is the factual scores at scale 2
    words = "brittle with scale=0.0 failed: ZeroDivisionError: float division by zero; settings far from its defaults"
    with pytest.raises(AppError, match=re.escape(words)):
        session.answer(toy_image, QUESTION, ["regular", brittle], {brittle: "scale=0"}, max_new_tokens=2)
    with pytest.raises(AppError, match=re.escape(words)):
        session.explain(toy_image, QUESTION, brittle, "scale=0", max_new_tokens=2)
    log = capsys.readouterr().err
    assert log.count("Traceback") == 2 and log.count("ZeroDivisionError: float division by zero") == 2
    words = "brittle with scale=1e+39: the combined scores of token 1 are not numbers (NaN or infinite)"
    with pytest.raises(AppError, match=re.escape(words)):
        session.explain(toy_image, QUESTION, brittle, "scale=1e39", max_new_tokens=2)


def test_a_bug_is_a_page_message_and_a_traceback_in_the_servers_log(session, toy_image, brittle, capsys):
    """An exception that is not the user's (a bug) is no numerical failure: the session lets it through, and the
    page's handler shows it as a message while the traceback goes to the server's log."""
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'causalmm[app]')")
    from causalmm.app.ui import build_app

    with pytest.raises(AttributeError):
        session.answer(toy_image, QUESTION, [brittle], {brittle: "scale=-1"}, max_new_tokens=2)
    capsys.readouterr()
    on_ask = next(f.fn for f in build_app(session).fns.values() if f.name == "on_ask")
    settings = ["scale=-1" if m == brittle else default_settings(m) for m in method_names() if default_settings(m)]
    message, table = on_ask(str(toy_image), QUESTION, [brittle], 0, 2, *settings)
    assert message.startswith("**error:** answering failed on a bug in causalmm (AttributeError: "), message
    log = capsys.readouterr().err
    assert "Traceback" in log and "factual.scaled(scale)" in log

def test_only_loopback_is_called_local():
    from causalmm.cli.common import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``causalmm app`` started as a user starts it, on a free port; yields its address."""
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'causalmm[app]')")
    port = _free_port()
    log = tmp_path_factory.mktemp("applog") / "app.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "causalmm", "app", "--port", str(port)], stdout=fh, stderr=fh,
                                env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the app did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    yield url, proc, log
    proc.terminate()
    proc.wait(timeout=30)


def test_the_app_in_a_browser_answers_as_the_api(served, browser, toy_image, tmp_path):
    """Upload an image, ask, tick two methods, wait for the answers: they are ``CausalMM.generate``'s for the same
    settings and seed; then an empty question shows a message in the page and the app goes on serving."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, proc, log = served
    start = len(log.read_text())  # the log of this test only (the page tests before it write tracebacks there)
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ask"))
    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(toy_image))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))  # the image as causalmm reads it
    question = "Is there a cup in the image? Please answer this question with one word."
    box = browser.find_element(By.CSS_SELECTOR, "#question textarea")
    box.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
    box.send_keys(question)
    for label in browser.find_elements(By.CSS_SELECTOR, "#methods label"):
        if label.text.strip() in ("causalmm", "vcd"):  # causalmm is ticked at the start: regular + vcd remain
            label.click()
    browser.find_element(By.CSS_SELECTOR, "#ask").click()

    def table():
        return browser.find_element(By.CSS_SELECTOR, "#answers").get_attribute("textContent")

    wait.until(lambda d: "vcd" in table() and "regular" in table() and "0." in table())
    cm = CausalMM.from_pretrained(str(shipped_model_path()))
    for method in ("regular", "vcd"):
        config = parse_settings(method, default_settings(method), seed=0)
        expected = cm.with_config(config).generate(toy_image, question, max_new_tokens=16).text
        # the rendered grid's cells, separated by white space: method, answer, seconds, settings
        row = rf"(^|\s){method}\s+{re.escape(expected.strip())}\s+\d+\.\d+\s"
        assert re.search(row, table()), (method, expected, table())
    browser.save_screenshot(str(tmp_path / "app.png"))
    assert (tmp_path / "app.png").stat().st_size > 10_000

    box.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
    browser.find_element(By.CSS_SELECTOR, "#ask").click()
    wait.until(lambda d: "question is empty" in d.find_element(By.CSS_SELECTOR, "#message").text)
    assert proc.poll() is None and "Traceback" not in log.read_text()[start:]
    assert urllib.request.urlopen(url, timeout=10).status == 200


@pytest.fixture(scope="module")
def client(served, tmp_path_factory):
    """gradio's own client on the served page: it uploads a file and calls the page's handlers over HTTP as the
    page's script does, where the browser test needs Chromium."""
    import inspect

    from gradio_client import Client

    quiet = {"analytics_enabled": False} if "analytics_enabled" in inspect.signature(Client).parameters else {}
    return Client(served[0], verbose=False, download_files=str(tmp_path_factory.mktemp("client")), **quiet)


def _plain(markdown: str) -> str:
    """A page message as the page shows it (the Markdown box's escapes undone)."""
    return re.sub(r"\\(.)", r"\1", markdown)


def _ask(client, upload, methods, *, n=4, seed=0):
    """The page's Answer button: the message and the answer rows (empty when there are none)."""
    from gradio_client import handle_file

    settings = [default_settings(m) for m in method_names() if default_settings(m)]  # one box per such method
    message, table = client.predict(handle_file(str(upload)), CUP, methods, seed, n, *settings, api_name="/on_ask")
    return _plain(message), (table.get("value") or {}).get("data")


def _preview(client, upload):
    """The page's handler of a new upload: the message and the preview's file (``None`` when there is none)."""
    from gradio_client import handle_file

    message, shown = client.predict(handle_file(str(upload)), api_name="/on_image")
    return _plain(message), shown


def test_the_page_hands_causalmm_the_uploaded_file(client, uploads):
    """Each upload is answered as ``CausalMM.generate`` answers the file (gradio's image box answered the grey and
    the transparent scene otherwise: it had decoded and written them again), and the preview is the image the
    loader reads, pixel for pixel."""
    from causalmm.images import load_image

    cm = CausalMM.from_pretrained(str(shipped_model_path()))
    for name, path in uploads.items():
        message, rows = _ask(client, path, ["regular", "causalmm"])
        assert message == "" and [r[0] for r in rows] == ["regular", "causalmm"], (name, message)
        for method, text, *_ in rows:
            config = parse_settings(method, default_settings(method))
            assert text == cm.with_config(config).generate(path, CUP, max_new_tokens=4).text, (name, method)
        message, shown = _preview(client, path)
        assert message == "" and np.array_equal(np.asarray(Image.open(shown)), np.asarray(load_image(path))), name


def test_an_unreadable_or_huge_upload_is_causalmms_message_in_the_page(client, served, tmp_path):
    """Not gradio's error and a traceback in the server's log: the loader's message, naming the uploaded file by
    its name, on upload (the preview) and on Answer; the app goes on serving."""
    url, proc, log = served
    start = len(log.read_text())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    huge = tmp_path / "huge.png"
    huge.write_bytes(_header_only_png(30000, 30000))
    for path, words in (
        (broken, "the image cannot be read: cannot read image broken.png: not an image file PIL can open"),
        (huge, "the image cannot be read: image huge.png has 900000000 pixels, more than the limit of"),
    ):
        for message, out in (_ask(client, path, ["regular"]), _preview(client, path)):
            assert message.startswith(f"**error:** {words}") and not out, message
            assert not re.search(rf"/\S*{path.name}", message), message  # not the server's copy of the file
    assert "Traceback" not in log.read_text()[start:] and proc.poll() is None
    assert urllib.request.urlopen(url, timeout=10).status == 200


def test_the_pages_number_boxes_are_checked_never_rounded_or_replaced(client, uploads):
    """A max-tokens box of 0 was answered with 16 tokens, 2.5 with 2: each is a message now, and so is a seed that
    is not a whole number."""
    path = uploads["rotated"]
    for n, words in (
        (0, "max new tokens 0 is out of range: give a whole number from 1 to 512"),
        (-3, "max new tokens -3 is out of range"),
        (2.5, "max new tokens 2.5 is not a whole number"),
        (None, "max new tokens is empty"),
    ):
        message, rows = _ask(client, path, ["regular"], n=n)
        assert message.startswith(f"**error:** {words}") and not rows, (n, message)
    message, rows = _ask(client, path, ["regular"], seed=1.5)
    assert message.startswith("**error:** seed 1.5 is not a whole number") and not rows, message
    message, rows = _ask(client, path, ["regular"], n=3.0, seed=2.0)
    assert message == "" and len(rows) == 1


def test_a_bad_port_is_one_line_before_any_model_load(causalmm_cli):
    """Bad settings are refused before gradio is imported or a model loaded (with or without gradio)."""
    bad = causalmm_cli("app", "--port", "70000", check=False)
    assert bad.returncode == 2 and "--port 70000 must be between 1 and 65535" in bad.stderr
    assert "Traceback" not in bad.stderr and "warning" not in bad.stderr
    for args, words in ((["--world", "nope"], "unknown toy world 'nope'"),
                        (["--world", "vision-prior", "--model", "x"], "--world picks a shipped toy-world model")):
        proc = causalmm_cli("app", *args, check=False)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    exposed = causalmm_cli("app", "--host", "0.0.0.0", "--port", "70000", check=False)
    assert "warning: binding 0.0.0.0" in exposed.stderr and exposed.returncode == 2


@pytest.fixture(scope="module")
def no_gradio(tmp_path_factory):
    """A ``PYTHONPATH`` folder whose ``gradio`` fails to import, as where the extra is not installed: an ``app``
    that stops naming its option there has stopped before importing gradio."""
    folder = tmp_path_factory.mktemp("no_gradio")
    (folder / "gradio").mkdir()
    (folder / "gradio" / "__init__.py").write_text("raise ImportError(\"No module named 'gradio'\")\n")
    return folder


def _app_without_gradio(no_gradio, *args: str) -> subprocess.CompletedProcess:
    """``causalmm app ARGS`` run as a user runs it, where gradio cannot be imported."""
    path = os.pathsep.join(filter(None, [str(no_gradio), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", PYTHONPATH=path)
    return subprocess.run([sys.executable, "-m", "causalmm", "app", *args], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    "host, words",
    [
        ("not a host", "--host 'not a host' is not an address or a host name; give one, e.g. 127.0.0.1"),
        ("999.1.1.1", "--host 999.1.1.1 is not an IPv4 address (four numbers from 0 to 255)"),
        ("[localhost]", "--host [localhost]: write the address without brackets, e.g. --host localhost"),
        ("", "--host is empty: give the address to serve on"),
        ("192.0.2.1", "--host 192.0.2.1 is not an address of this machine"),  # TEST-NET-1: no machine's address
        ("127.0.0.1", None),
        ("localhost", None),
        ("0.0.0.0", None),
    ],
)
def test_check_host_says_what_is_wrong_with_an_address(host, words):
    from causalmm.app.ui import check_host

    problem = check_host(host)
    assert problem == words if words is None else problem.startswith(words), problem


def test_check_port_names_a_port_in_use_and_a_free_one():
    from causalmm.app.ui import check_port

    assert check_port("127.0.0.1", 70000) == "--port 70000 must be between 1 and 65535"
    assert check_port("127.0.0.1", _free_port()) is None
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        problem = check_port("127.0.0.1", port)
    found = re.fullmatch(rf"--port {port} is in use on 127\.0\.0\.1 \(.+\); pick another, e\.g\. --port (\d+)", problem)
    assert found and int(found[1]) > port, problem


def test_a_host_or_port_the_app_cannot_serve_on_is_one_line_before_gradio(no_gradio):
    """Run as a user runs it: one ``error:`` line naming the option, exit code 2, before gradio is imported (it
    cannot be, here) or a model loaded."""
    for host, words in (("not a host", "--host 'not a host' is not an address or a host name"),
                        ("999.1.1.1", "--host 999.1.1.1 is not an IPv4 address")):  # fmt: skip
        proc = _app_without_gradio(no_gradio, "--host", host, "--port", str(_free_port()))
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {words}"), proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stdout == "", proc.stderr
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = _app_without_gradio(no_gradio, "--port", str(port))
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: --port {port} is in use on 127.0.0.1 (")
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_the_app_names_its_extra_with_the_brackets(causalmm_cli, no_gradio):
    """rich reads ``[app]`` as markup: the help said ``pip install 'causalmm'``, and so did the error without
    gradio."""
    assert "pip install 'causalmm[app]'" in causalmm_cli("app", "--help").stdout
    proc = _app_without_gradio(no_gradio, "--port", str(_free_port()))
    assert proc.returncode == 2 and proc.stderr == "error: the app needs gradio: pip install 'causalmm[app]'\n"


def test_examples_are_the_chosen_worlds_test_images():
    import numpy as np
    from PIL import Image

    from causalmm.app.ui import examples
    from causalmm.toyworld import eval_scenes, render, vision_prior_world

    config = vision_prior_world()
    want = [np.asarray(render(config, s)) for s in eval_scenes(config, "test", 2)]
    got = [np.asarray(Image.open(p).convert("RGB")) for p in examples(2, world="vision-prior")]
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    default = [np.asarray(Image.open(p).convert("RGB")) for p in examples(2)]
    assert not np.array_equal(default[0], got[0])
