"""``causalmm app``: the page's logic on the shipped toy-world model (answers = ``CausalMM.generate``, bad input
= a message), and the page itself driven in headless Chromium as a user drives it."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from causalmm import CausalMM, CausalMMConfig
from causalmm.app import AppError, Session, default_settings, parse_settings
from causalmm.methods import method_names
from causalmm.toyworld.model import shipped_model_path

QUESTION = "Is there a cat in the image? Please answer this question with one word."


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
    with pytest.raises(AppError, match="between 1 and 512"):
        session.answer(toy_image, QUESTION, ["regular"], {}, max_new_tokens=0)
    # a setting this model cannot take (its LLM has 4 layers) is a message in both tabs, not a traceback
    with pytest.raises(AppError, match="sid: layer=9 is out of range"):
        session.answer(toy_image, QUESTION, ["sid"], {"sid": "layer=9"})
    with pytest.raises(AppError, match="sid: layer=9 is out of range"):
        session.explain(toy_image, QUESTION, "sid", "layer=9")


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
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ask"))
    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(toy_image))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
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
    assert proc.poll() is None and "Traceback" not in log.read_text()
    assert urllib.request.urlopen(url, timeout=10).status == 200


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
