"""The methods registry: it owns the names, and a new branch-style method is one file plus its tests."""

import pytest
import torch

from causalmm import CausalMMConfig, ConfigError, Switches
from causalmm.methods import METHODS, Branch, Method, Param, get_method, method_names, register
from causalmm.methods.registry import METHODS as REGISTRY


def test_the_registry_owns_the_names():
    assert method_names()[:3] == ("regular", "causalmm", "vcd")
    for name in method_names():
        assert CausalMMConfig(method=name).method == name
        assert get_method(name).name == name and get_method(name).summary
    with pytest.raises(ConfigError, match="choose one of: regular, causalmm, vcd"):
        CausalMMConfig(method="nope")
    with pytest.raises(KeyError, match="registered: regular"):
        get_method("nope")


def test_every_method_declares_its_parameters_with_their_origin():
    fields = set(CausalMMConfig.__dataclass_fields__)
    for method in METHODS.values():
        cfg = CausalMMConfig(method=method.name)
        for p in method.params:
            assert p.source, (method.name, p.field)
            got = getattr(cfg, p.field) if p.field in fields else cfg.param(p.field)
            assert got == p.default, (method.name, p.field)
        assert set(cfg.params) == {p.field for p in method.own_params()}


def test_own_parameters_are_typed_checked_and_refused_by_other_methods():
    @register
    class Tuned(Method):
        name = "test_tuned"
        summary = "a method with parameters of its own"
        params = (
            Param("gamma", 2.5, "a default of its own for a shared field"),
            Param("alpha", 0.2, "a float of its own", check=lambda v: None if v >= 0 else "must be >= 0"),
            Param("start_layer", 2, "an int of its own"),
        )

    try:
        cfg = CausalMMConfig(method="test_tuned")
        assert cfg.gamma == 2.5 and cfg.epsilon == 0.1  # its default; the fallback where it declares none
        assert cfg.params == {"alpha": 0.2, "start_layer": 2}
        cfg = CausalMMConfig(method="test_tuned", gamma=0.0, params={"alpha": "1", "start_layer": "3"})
        assert cfg.gamma == 0.0 and cfg.params == {"alpha": 1.0, "start_layer": 3}
        assert CausalMMConfig.from_dict(cfg.to_dict()) == cfg
        with pytest.raises(ConfigError, match="alpha=-1.0: must be >= 0"):
            CausalMMConfig(method="test_tuned", params={"alpha": -1})
        with pytest.raises(ConfigError, match="start_layer=2.5 must be int"):
            CausalMMConfig(method="test_tuned", params={"start_layer": 2.5})
        with pytest.raises(ConfigError, match="no parameter beta; its parameters: alpha, start_layer"):
            CausalMMConfig(method="test_tuned", params={"beta": 1})
        with pytest.raises(ConfigError, match="'vcd' has no parameter alpha"):
            CausalMMConfig(method="vcd", params={"alpha": 1})
        # another method starts from its own parameters, not these
        assert cfg.replace(method="vcd").params == {} and "params" not in CausalMMConfig().to_dict()
    finally:
        REGISTRY.pop("test_tuned", None)


def test_a_name_cannot_be_registered_twice():
    class Again(Method):
        name = "vcd"
        summary = "a second vcd"

    with pytest.raises(ValueError, match="already registered"):
        register(Again)


def test_a_new_branch_method_runs_without_touching_the_engine(loaded, images):
    """A method defined in one place (here, the test) with an existing kind of branch runs end to end, and its
    rule is what the engine applies."""

    @register
    class HalfNoise(Method):
        name = "test_half_noise"
        summary = "half of VCD's contrast, to prove the registry"
        plausible_only = False

        def branches(self, config):
            return (Branch("noise", noise=True),)

        def combine(self, factual, counterfactuals, config, step):
            return factual + 0.5 * (factual - counterfactuals["noise"])

    try:
        cm = loaded("llava")
        cfg = CausalMMConfig(method="test_half_noise", seed=3)
        out = cm.with_config(cfg).generate(images[0], "Describe.", max_new_tokens=4, return_branch_logits=True)
        logs = out.branch_logits
        want = logs["factual"] + 0.5 * (logs["factual"] - logs["noise"])
        assert torch.allclose(logs["combined"], want)
        assert out.token_ids == logs["combined"].argmax(-1).tolist()
        # the noise branch is VCD's: same seed, same counterfactual logits
        vcd = cm.with_config(CausalMMConfig(method="vcd", seed=3)).generate(
            images[0], "Describe.", max_new_tokens=1, return_branch_logits=True
        )
        assert torch.allclose(vcd.branch_logits["noise"][0], logs["noise"][0])
    finally:
        REGISTRY.pop("test_half_noise", None)


def test_switches_are_one_typed_object(loaded):
    cm = loaded("llava")
    assert cm.switches == Switches()
    off = cm.with_config(cm.config, reuse_prefix=False, plausible_head=False)
    assert off.switches == Switches(reuse_prefix=False, plausible_head=False)
    assert off.with_config(cm.config).switches == off.switches  # kept unless changed
    with pytest.raises(ConfigError, match="unknown engine switch.*reuse_prefix"):
        cm.with_config(cm.config, reuse_prefixes=False)


def test_the_cli_lists_the_registry(causalmm_cli):
    out = causalmm_cli("methods").stdout
    for name in ("regular", "causalmm", "vcd"):
        assert name in out
    # each setting as it is given on the command line, with its range
    assert "DAMO-NLP-SG/VCD" in out and "--noise-step 500, [0, 999]" in out and "--param lamb=0.02, [0, inf)" in out
