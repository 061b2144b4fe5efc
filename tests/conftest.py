"""Shared fixtures: tiny random-weight models of every supported family, built once per test session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from causalmm import CausalMM, CausalMMConfig  # noqa: E402
from causalmm.tiny import FAMILIES, GENERIC_FAMILIES, build_tiny_model  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add overhead


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {fam: build_tiny_model(fam, root / fam) for fam in FAMILIES}


@pytest.fixture(scope="session")
def loaded(model_dirs):
    """One eager-base CausalMM per family (eager underneath makes stock parity bit-exact)."""
    cache = {}

    def get(family: str, base: str = "eager") -> CausalMM:
        if (family, base) not in cache:
            cache[(family, base)] = CausalMM.from_pretrained(
                str(model_dirs[family]), CausalMMConfig(method="regular"), base=base
            )
        return cache[(family, base)]

    return get


@pytest.fixture(scope="session")
def generic_dirs(tmp_path_factory):
    """Tiny models of the families the generic adapter serves (built once, shared by every test module)."""
    root = tmp_path_factory.mktemp("tiny_generic")
    return {fam: build_tiny_model(fam, root / fam) for fam in GENERIC_FAMILIES}


@pytest.fixture(scope="session")
def generic(generic_dirs):
    """One CausalMM per (family, base) of the generic families; eager underneath makes stock parity bit-exact."""
    cache = {}

    def get(family: str, base: str = "eager") -> CausalMM:
        if (family, base) not in cache:
            cache[(family, base)] = CausalMM.from_pretrained(
                str(generic_dirs[family]), CausalMMConfig(method="regular"), base=base
            )
        return cache[(family, base)]

    return get


@pytest.fixture(scope="session")
def any_family(loaded, generic):
    """The CausalMM of any tiny family, adapter or generic (eager base)."""

    def get(family: str) -> CausalMM:
        return loaded(family) if family in FAMILIES else generic(family)

    return get


@pytest.fixture(scope="session")
def images():
    """Textured images (a flat image makes every attention map equivalent) of different sizes."""
    g = torch.Generator().manual_seed(0)

    def make(h, w):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        return Image.fromarray(arr)

    return [make(48, 40), make(40, 100), make(64, 64)]


@pytest.fixture(scope="session")
def image_file(tmp_path_factory, images):
    path = tmp_path_factory.mktemp("img") / "img.png"
    images[0].save(path)
    return path


@pytest.fixture(scope="session")
def causalmm_cli():
    """Run ``python -m causalmm ARGS`` as a user would (offline); asserts success unless check=False."""
    import subprocess
    import sys

    def run(*args, check=True, timeout=600):
        env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
        proc = subprocess.run(
            [sys.executable, "-m", "causalmm", *map(str, args)], capture_output=True, text=True, env=env,
            timeout=timeout,
        )
        if check:
            assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    return run


#: Debian's Chromium and its driver (`make test` installs them where it can: `make browser`)
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """Headless Chromium driven by Selenium, one per test session; skips, saying why, where it is missing."""
    import shutil

    selenium = pytest.importorskip("selenium", reason="selenium is not installed (the test extra has it)")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            pytest.skip(f"{path} not found: install Debian's chromium and chromium-driver (`make browser`)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    del selenium
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # the machine's network is closed: without the background-networking flags Chromium keeps dialling out
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1800",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def vti_demos(tmp_path_factory):
    """Three VTI demos in the official format, on textured images of the size of ``images[0]`` (48 x 40)."""
    import json

    root = tmp_path_factory.mktemp("vti_demos")
    g = torch.Generator().manual_seed(5)
    lines = []
    for i in range(3):
        arr = (torch.rand(48, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"d{i}.png")
        lines.append({"image": f"d{i}.png", "question": "Describe this image in detail.",
                      "value": "A cat sits on a mat.", "h_value": "A cat and a dog sit on a mat."})  # fmt: skip
    (root / "demos.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root / "demos.jsonl"


@pytest.fixture(scope="session")
def vti_vectors(loaded, vti_demos, tmp_path_factory):
    """family -> the path of VTI's directions fitted on its tiny model (2 demos, 2 trials; the tower's where it is
    no packed sequence), fitted once per session."""
    from causalmm.fit.store import save_fitted
    from causalmm.fit.vti import fit_vti, read_demos

    root, cache = tmp_path_factory.mktemp("vti_vectors"), {}

    def get(family: str) -> str:
        if family not in cache:
            cm = loaded(family)
            fit = fit_vti(cm.adapter, read_demos(vti_demos), n_demos=2, trials=2, vision=not cm.adapter.packed)
            cache[family] = str(save_fitted(fit, root / f"{family}.safetensors"))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_matcher(tmp_path_factory):
    """The folder of a tiny random-weight BLIP image-text matching model and its processor (AGLA's matcher)."""
    from causalmm.tiny.blip import build_tiny_matcher

    return str(build_tiny_matcher(tmp_path_factory.mktemp("tiny_matcher")))
