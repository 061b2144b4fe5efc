"""Every setting bounded and checked before any work, settable the way `causalmm methods` says, and refused where
it would not apply (a run never records a setting as applied that was not)."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from causalmm import CausalMMConfig, ConfigError, InputError
from causalmm.cli import app
from causalmm.cli.common import setting_flag
from causalmm.decoding import GenerationOptions
from causalmm.methods import METHODS, get_method, method_names
from causalmm.methods.m3id import m3id_scores, m3id_weight

Q = "Describe it."


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error:"), err
    for needle in needles:
        assert needle in err, err


# -- 1. every number bounded, checked before any work ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"num_beams": 100_000}, r"num_beams=100000 must be in \[1, 64\]"),
        ({"max_new_tokens": 10**9}, r"max_new_tokens=1000000000 must be in \[1, 1048576\]"),
        ({"do_sample": True, "temperature": 1e-40}, r"temperature=1e-40 must be in \[0.01, 100\]"),
        ({"do_sample": True, "temperature": 1e3}, r"temperature=1000.0 must be in \[0.01, 100\]"),
        ({"repetition_penalty": 1e-300}, r"repetition_penalty=1e-300 must be in \[0.01, 100\]"),
        ({"num_beams": 2, "length_penalty": 1e300}, r"length_penalty=1e\+300 must be in \[-10, 10\]"),
        ({"num_beams": 2, "length_penalty": -11.0}, r"length_penalty=-11.0 must be in \[-10, 10\]"),
        ({"max_new_tokens": 10**5000}, r"max_new_tokens=<an integer of 16610 bits> must be in \[1, 1048576\]"),
    ],
)
def test_generation_options_out_of_range_are_refused_before_any_work(options, needle):
    # before: 100000 beams hung, a tiny temperature or penalty gave torch's "probability tensor contains inf",
    # a huge length penalty an OverflowError from the beam ranking
    with pytest.raises(ConfigError, match=needle):
        GenerationOptions(**options)


def test_counts_of_tokens_are_bounded_by_the_vocabulary(loaded, images):
    cm = loaded("llava")
    vocab = cm.model.get_output_embeddings().weight.shape[0]
    with pytest.raises(ConfigError, match=f"top_k={vocab + 1} is more than the model's vocabulary of {vocab} tokens"):
        cm.generate(images[0], Q, max_new_tokens=2, do_sample=True, top_k=vocab + 1)
    # a method's own count of tokens: when the engine first sees the model, before any generation
    with pytest.raises(ConfigError, match=f"deco: top_k={vocab + 1} is more than the model's vocabulary of {vocab}"):
        cm.with_config(CausalMMConfig(method="deco", params={"top_k": vocab + 1}))
    assert len(cm.generate(images[0], Q, max_new_tokens=2, do_sample=True, top_k=vocab).token_ids) == 2


def test_opera_candidates_and_beams_are_bounded_before_the_model_runs():
    # before: candidates above the vocabulary reached topk ("selected index k out of range")
    with pytest.raises(ConfigError, match=r"candidates=100000: must be in \[1, 64\]"):
        CausalMMConfig(method="opera", params={"candidates": 100_000})
    with pytest.raises(ConfigError, match=r"beams=65: must be in \[2, 64\]"):
        CausalMMConfig(method="opera", params={"beams": 65})


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"gamma": 1e38}, r"gamma=1e\+38 is above 100.*give a gamma in \[0, 100\]"),
        ({"num_cf_samples": 10**6}, r"num_cf_samples=1000000 must be an integer in \[1, 64\]"),
        ({"seed": 2**63}, r"seed=9223372036854775808 must be in \[-9223372036854775808, 9223372036854775807\]"),
        ({"seed": 10**5000}, r"seed=<an integer of 16610 bits> must be in \["),
        ({"gamma": 10**400}, "gamma=<an integer of 1329 bits> must be a finite number"),
        ({"language_layers": "0-1000000000000"}, "language_layers index 1000000000000 is beyond any model's layers"),
        ({"method": "pai", "params": {"alpha": 1e30}}, r"alpha=1e\+30: must be in \[0, 10\]"),
        ({"method": "avisc", "params": {"lamb": 1e308}}, r"lamb=1e\+308: must be in \[0, 100\]"),
        ({"method": "deco", "params": {"alpha": 1e9}}, r"alpha=1000000000.0: must be in \[0, 100\]"),
        ({"method": "opera", "params": {"penalty": 1e308}}, r"penalty=1e\+308: must be in \[0, 100\]"),
        ({"method": "m3id", "params": {"lamb": 10**5000}}, "lamb=<an integer of 16610 bits> must be float"),
    ],
)
def test_config_values_out_of_range_are_refused_naming_the_range(config, needle):
    # before: a huge gamma picked tokens from inf - inf, a huge seed or integer raised ValueError printing it,
    # '0-10**12' built a list of 10**12 layers, a huge PAI alpha or AvisC lamb turned the scores into nan
    with pytest.raises(ConfigError, match=needle):
        CausalMMConfig(**config)


def test_per_sample_seeds_are_64_bit(loaded, images):
    with pytest.raises(InputError, match=r"seeds holds <an integer of 16610 bits>, which must be in \["):
        loaded("llava").generate(images[0], Q, max_new_tokens=2, seeds=[10**5000])


def test_the_m3id_weight_is_the_official_one_wherever_that_is_finite():
    for lamb in (0.0, 0.02, 0.5, 1.0, 5.0):
        for t in (1, 2, 10, 100):
            keep = math.exp(-lamb * t)
            if keep > 0:
                assert m3id_weight(lamb, t) == (1 - keep) / keep  # AvisC's expression, bit for bit
    assert m3id_weight(0.02, 10**6) == math.inf  # official: ZeroDivisionError (e^{-20000} is 0.0)
    g = torch.Generator().manual_seed(0)
    lc, lu = torch.randn(50, generator=g) * 3, torch.randn(50, generator=g) * 3
    for t in (1, 5, 40):
        keep = math.exp(-0.5 * t)
        lcs, lus = torch.log_softmax(lc, -1), torch.log_softmax(lu, -1)
        official = lcs + ((1 - keep) / keep) * (lcs - lus)
        official = official.masked_fill(lc < math.log(0.1) + lc.max(), -math.inf)
        assert torch.equal(m3id_scores(lc, lu, t=t, lamb=0.5, alpha=1.0, epsilon=0.1), official)


def test_the_m3id_weight_in_its_stable_form_where_the_official_one_overflows():
    g = torch.Generator().manual_seed(1)
    lc, lu = torch.randn(50, generator=g) * 3, torch.randn(50, generator=g) * 3
    kept = lc >= math.log(0.1) + lc.max()
    for lamb, t in ((2.0, 50), (300.0, 3), (1e300, 1)):  # float32 overflow; a division by 0.0; an inf exponent
        z = m3id_scores(lc, lu, t=t, lamb=lamb, alpha=1.0, epsilon=0.1)
        assert torch.isfinite(z[kept]).all() and (z[~kept] == -math.inf).all()
        assert z[kept].abs().max() <= 1e30
        # the weight's limit ranks the plausible tokens by lc - lu
        d = (torch.log_softmax(lc, -1) - torch.log_softmax(lu, -1)).masked_fill(~kept, -math.inf)
        assert int(z.argmax()) == int(d.argmax())


def test_m3id_decodes_with_any_lamb_and_answer_length(loaded, images):
    cm = loaded("llava").with_config(CausalMMConfig(method="m3id", params={"lamb": 300.0, "alpha": 1.0}))
    # before: ZeroDivisionError at the third token (e^{-900} is 0.0)
    for options in ({}, {"do_sample": True}, {"num_beams": 3}):
        assert len(cm.generate(images[0], Q, max_new_tokens=6, **options).token_ids) > 0


def test_cli_num_beams_beyond_the_bound_is_one_line_before_loading(tmp_path, image_file, causalmm_cli):
    # the model path does not exist: the error is about the beams, so nothing was loaded (before: a hang)
    args = ["generate", "--model", tmp_path / "no-model", "--image", image_file, "--prompt", Q]
    proc = causalmm_cli(*args, "--num-beams", "100000", check=False)
    _one_line_error(proc, "num_beams=100000 must be in [1, 64]")


# -- 2. every listed setting settable as `causalmm methods` says ------------------------------------------------------

#: a valid value other than the default for each setting, on the tiny LLaVA (4 LLM layers, vocabulary 506)
VALUES = {
    "mode": "joint", "vision_cf": "uniform", "language_cf": "shuffle", "vision_layers": "all",
    "language_layers": "all", "vision_heads": "0", "language_heads": "1", "gamma": "2.0", "epsilon": "0.2",
    "num_cf_samples": "2", "legacy": "true", "vision_style": "gate", "renormalize": "false", "noise_step": "999",
    "noise_schedule": "sigmoid", ("icd", "prefix"): "2", ("m3id", "lamb"): "0.5", ("m3id", "alpha"): "0.9",
    ("pai", "gamma"): "2.0", ("pai", "alpha"): "0.5", ("pai", "start_layer"): "1", ("pai", "edit_prefill"): "true",
    ("avisc", "layer_gamma"): "0.9", ("avisc", "lamb"): "0.5", ("sid", "layer"): "1", ("sid", "keep"): "2",
    ("dola", "layers"): "0,2", ("deco", "alpha"): "1.0", ("deco", "top_k"): "5", ("deco", "top_p"): "0.5",
    ("deco", "layers"): "1-2", ("opera", "beams"): "3", ("opera", "scale"): "20.0", ("opera", "threshold"): "25",
    ("opera", "candidates"): "2", ("opera", "penalty"): "2.0", ("vaf", "enhance"): "1.5", ("vaf", "suppress"): "0.5",
    ("vaf", "layers"): "0-2", ("memvr", "ratio"): "0.3", ("memvr", "threshold"): "0.5", ("memvr", "start"): "1",
    ("memvr", "end"): "2", ("vista", "lam"): "0.2", ("vista", "mix"): "0.5", ("vista", "logits_layers"): "0-1",
    ("ritual", "alpha"): "2.0", ("ritual", "size"): "224", ("only", "alpha_pos"): "2.0", ("only", "alpha_neg"): "0.5",
    ("only", "layer"): "1", ("vti", "alpha_text"): "0.5", ("vti", "alpha_image"): "2.0", ("agla", "alpha"): "1.0",
    ("agla", "gradcam_layer"): "5", ("agla", "keep"): "0.5",
}  # fmt: skip
#: the settings a method's defaults need on the tiny LLaVA (its official layers are LLaVA-1.5-7B's 32), given beside
#: the one under test
FIT = {"vaf": {"layers": "1-2"}, "memvr": {"start": "0", "end": "3"}, "vista": {"logits_layers": "1-2"}}
LISTED = [(m, p) for m in method_names() for p in get_method(m).params]


@pytest.fixture(scope="module")
def cli_json(model_dirs, image_file):
    """``causalmm generate ... --json`` through the real command line, in this process (one model load a run)."""
    runner = CliRunner()

    def run(*flags: str) -> dict:
        args = ["generate", "--model", str(model_dirs["llava"]), "--image", str(image_file), "--prompt", Q]
        result = runner.invoke(app, [*args, "--max-new-tokens", "1", "--attention", "eager", "--json", *flags])
        assert result.exit_code == 0, (flags, result.output[-2000:], result.exception)
        return json.loads(result.stdout)

    return run


@pytest.mark.parametrize(("method", "param"), LISTED, ids=[f"{m}-{p.field}" for m, p in LISTED])
def test_every_listed_setting_is_settable_as_the_listing_says(method, param, cli_json, vti_vectors, tiny_matcher):
    # before: --noise-step, --noise-schedule and --no-renormalize did not exist, though listed
    shared = param.field not in {p.field for p in get_method(method).own_params()}
    # VTI reads directions fitted on the model, AGLA a matcher model: the tiny ones stand in
    agla = {"matcher": "self"} if param.field == "keep" else {"matcher": tiny_matcher}  # keep: matcher=self's
    fits = {**FIT, "vti": {"vectors": vti_vectors("llava")}, "agla": agla}
    files = {("vti", "vectors"): fits["vti"]["vectors"], ("agla", "matcher"): tiny_matcher}
    value = files.get((method, param.field), VALUES.get((method, param.field), VALUES.get(param.field)))
    flags = setting_flag(param.field, shared, value).split()  # what `causalmm methods` shows for it
    fit = [f for k, v in fits.get(method, {}).items() if k != param.field for f in ("--param", f"{k}={v}")]
    config = cli_json("--method", method, *flags, *fit)["config"]
    if shared:
        want = CausalMMConfig(method=method, **{param.field: _typed(param.field, value)}).to_dict()[param.field]
        got = config[param.field]
    else:
        fitted = {k: v for k, v in fits.get(method, {}).items() if k != param.field}
        want = CausalMMConfig(method=method, params={param.field: value, **fitted}).param(param.field)
        got = config["params"][param.field]
    assert got == want and want != param.default


def _typed(field: str, text: str):
    """A shared setting's text as the config takes it (the command line types it the same way)."""
    default = CausalMMConfig.__dataclass_fields__[field].default
    if field in ("gamma", "epsilon"):
        return float(text)
    if isinstance(default, bool):
        return text == "true"
    return int(text) if isinstance(default, int) else text


def test_cli_noise_step_and_schedule_match_the_api(model_dirs, image_file, loaded, causalmm_cli):
    args = ["generate", "--model", model_dirs["llava"], "--image", image_file, "--prompt", Q, "--json"]
    args += ["--max-new-tokens", "4", "--attention", "eager", "--method", "vcd"]
    payload = json.loads(causalmm_cli(*args, "--noise-step", "999", "--noise-schedule", "sigmoid").stdout)
    assert payload["config"]["noise_step"] == 999 and payload["config"]["noise_schedule"] == "sigmoid"
    cfg = CausalMMConfig(method="vcd", noise_step=999, noise_schedule="sigmoid")
    assert payload["token_ids"] == loaded("llava").with_config(cfg).generate(image_file, Q, max_new_tokens=4).token_ids


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--method", "vcd", "--param", "gamma=2"], ["--param gamma=2: gamma is a setting the methods", "--gamma 2"]),
        (["--method", "vcd", "--param", "noise_step=300"], ["give --noise-step 300"]),
        (["--param", "num_cf_samples=2"], ["give --samples 2"]),
        (["--param", "legacy=true"], ["give --legacy"]),
        (["--method", "m3id", "--param", "gamma=2"], ["--gamma does not apply to method 'm3id'", "--param lamb=VALUE"]),
        (["--method", "regular", "--param", "alpha=1"], ["'regular' has no parameter alpha", "alpha is a param"]),
        (["--method", "pai", "--param", "lamb=1"], ["'pai' has no parameter lamb", "lamb is a parameter of m3id"]),
    ],
)  # fmt: skip
def test_cli_param_names_the_right_option(flags, needles, tmp_path, image_file, causalmm_cli):
    # before: "--param gamma=2" said the method "has no parameters of its own"; refused before any model loads
    args = ["generate", "--model", tmp_path / "no-model", "--image", image_file, "--prompt", Q, *flags]
    _one_line_error(causalmm_cli(*args, check=False), *needles)


def test_api_params_and_fields_each_in_their_place():
    with pytest.raises(ConfigError, match=r"gamma is a setting the methods share.*CausalMMConfig\(gamma=...\)"):
        CausalMMConfig(method="vcd", params={"gamma": 2})
    with pytest.raises(ConfigError, match="gamma \\(given in params\\) does not apply to method 'm3id'"):
        CausalMMConfig(method="m3id", params={"gamma": 2})
    with pytest.raises(ConfigError, match='unknown config field lamb: it is a parameter of method m3id.*"params"'):
        CausalMMConfig.from_dict({"method": "m3id", "lamb": 0.5})


# -- 3. what does not apply is refused, never silently ignored or recorded ---------------------------------------------


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"method": "regular", "gamma": 2.0}, "gamma=2.0 does not apply to method 'regular'"),
        ({"method": "m3id", "gamma": 2.0}, "gamma=2.0 does not apply to method 'm3id' \\(it is read by causalmm"),
        ({"method": "deco", "epsilon": 0.5}, "epsilon=0.5 does not apply to method 'deco'"),
        ({"method": "vcd", "mode": "vision"}, "mode='vision' does not apply to method 'vcd' \\(it is read by causalmm"),
        ({"method": "icd", "num_cf_samples": 3}, "num_cf_samples=3 does not apply to method 'icd'"),
        ({"method": "sid", "legacy": True}, "legacy=True does not apply to method 'sid'"),
        ({"method": "causalmm", "noise_step": 100}, "noise_step=100 does not apply to method 'causalmm' \\(it is"),
        ({"mode": "language", "vision_layers": "all"}, "vision_layers='all' does not apply in mode language"),
        ({"mode": "language", "vision_style": "gate"}, "vision_style='gate' does not apply in mode language"),
        ({"mode": "vision", "language_heads": [0]}, "language_heads=\\(0,\\) does not apply in mode vision"),
    ],
)  # fmt: skip
def test_api_settings_a_method_does_not_read_are_refused(config, needle):
    # before: accepted, ignored by the run, and recorded in its config as if applied
    with pytest.raises(ConfigError, match=needle):
        CausalMMConfig(**config)


def test_a_written_config_reads_back_and_a_new_method_starts_from_what_it_reads():
    for name in METHODS:
        cfg = CausalMMConfig(method=name)
        assert CausalMMConfig.from_dict(cfg.to_dict()) == cfg  # defaults named in full are not "set"
    cfg = CausalMMConfig(mode="language", language_layers="all", gamma=2.0, num_cf_samples=2)
    vcd = cfg.replace(method="vcd")  # mode and language_layers are not VCD's: back to their defaults
    assert (vcd.mode, vcd.language_layers, vcd.gamma, vcd.num_cf_samples) == ("multimodal", None, 2.0, 2)
    assert cfg.replace(method="regular").gamma == 1.0  # not read: the fallback, not causalmm's 2.0


REGULAR = {"method": "regular"}


@pytest.mark.parametrize(
    ("config", "options", "needle"),
    [
        (REGULAR, {"temperature": 0.7}, "temperature=0.7 acts on sampling only, and do_sample is False"),
        (REGULAR, {"top_p": 0.9}, "top_p=0.9 acts on sampling only"),
        (REGULAR, {"top_k": 5}, "top_k=5 acts on sampling only"),
        (REGULAR, {"length_penalty": 2.0}, "length_penalty=2.0 acts on beam search only, and num_beams is 1"),
        (REGULAR, {"early_stopping": True}, "early_stopping=True acts on beam search only"),
        ({"method": "opera", "params": {"beams": 3}}, {"num_beams": 4}, "num_beams=4 and OPERA's beams=3 disagree"),
    ],
)
def test_api_generation_options_that_would_be_ignored_are_refused(config, options, needle, loaded, images):
    # before: generated as if they were not given
    cm = loaded("llava").with_config(CausalMMConfig(**config))
    with pytest.raises(ConfigError, match=needle):
        cm.generate(images[0], Q, max_new_tokens=2, **options)


def test_api_options_that_apply_are_taken(loaded, images):
    cm = loaded("llava")
    cm.generate(images[0], Q, max_new_tokens=2, temperature=1.0)  # the neutral value: indistinguishable from unset
    opera = cm.with_config(CausalMMConfig(method="opera", params={"candidates": 1, "threshold": 25}))
    opera.generate(images[0], Q, max_new_tokens=2, length_penalty=0.5)  # OPERA is a beam search
    opera.generate(images[0], Q, max_new_tokens=2, num_beams=3)  # its default beams give way to num_beams


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--method", "regular", "--gamma", "1"], ["--gamma does not apply to method 'regular'", "leave --gamma"]),
        (["--method", "vcd", "--mode", "multimodal"], ["--mode does not apply to method 'vcd'", "--noise-step"]),
        (["--method", "dola", "--samples", "1"], ["--samples does not apply to method 'dola'", "--param layers=VALUE"]),
        (["--method", "pai", "--legacy"], ["--legacy does not apply to method 'pai' (it is read by causalmm)"]),
        (["--method", "causalmm", "--noise-schedule", "sigmoid"], ["--noise-schedule does not apply", "read by vcd"]),
        (["--mode", "language", "--vision-layers", "all"], ["--vision-layers does not apply in --mode language",
                                                              "choose --mode vision / multimodal / joint"]),
        (["--mode", "vision", "--language-heads", "0"], ["--language-heads does not apply in --mode vision"]),
        (["--temperature", "1.0"], ["--temperature acts on sampling only: add --do-sample"]),
        (["--top-p", "0.9"], ["--top-p acts on sampling only"]),
        (["--top-k", "3"], ["--top-k acts on sampling only"]),
        (["--length-penalty", "1.0"], ["--length-penalty acts on beam search only: add --num-beams N"]),
        (["--early-stopping", "true"], ["--early-stopping acts on beam search only"]),
        (["--method", "opera", "--param", "beams=3", "--num-beams", "4"], ["--num-beams and --param beams both"]),
    ],
)  # fmt: skip
def test_cli_flags_that_would_not_apply_are_refused_before_loading(flags, needles, tmp_path, image_file, causalmm_cli):
    # the model path does not exist: each error comes first, before anything loads (before: ignored, and
    # recorded in --json's config and a run's run.json as if applied); a typed default is refused too
    args = ["generate", "--model", tmp_path / "no-model", "--image", image_file, "--prompt", Q, *flags]
    _one_line_error(causalmm_cli(*args, check=False), *needles)


def test_cli_eval_refuses_a_flag_that_would_not_apply_and_writes_nothing(tmp_path, causalmm_cli):
    out = tmp_path / "run"
    proc = causalmm_cli("eval", "pope", "--model", tmp_path / "no-model", "--data", tmp_path / "q.json",
                        "--out", out, "--method", "regular", "--gamma", "2", check=False)  # fmt: skip
    _one_line_error(proc, "--gamma does not apply to method 'regular'")
    assert not out.exists()


def test_cli_options_that_apply_are_taken(cli_json):
    cli_json("--do-sample", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9")
    cli_json("--num-beams", "2", "--length-penalty", "0.5", "--early-stopping", "never")
    cli_json("--method", "opera", "--param", "candidates=1", "--length-penalty", "0.5")  # OPERA's own beams
    cli_json("--mode", "language", "--language-layers", "all", "--no-repeat-ngram-size", "2")
