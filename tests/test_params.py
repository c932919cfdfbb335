"""Hyper-parameter rules (veridical.params), their use by every registered method, the method-stack
syntax, and the torch-free method listing (veridical.catalog, veridical/methods.json).

The cases over methods are parametrized over the live registry, so a new method is covered without
editing this file. Expected messages are written out here, not produced by the code under test.
"""

import json
import math
import subprocess
import sys

import pytest

from veridical import catalog
from veridical.errors import MethodSpecError
from veridical.params import Choice, Custom, Flag, Integer, Layers, Optional, Real
from veridical.registry import (
    build_method,
    hyperparameter_rules,
    hyperparameters,
    list_methods,
    method_class,
    parse_method_spec,
    parse_method_stack,
    validate_spec,
)

NOT_NUMBERS = [math.nan, math.inf, -math.inf, "abc", "1.0", True, None, [1.0]]


def builtin_methods() -> list[str]:
    """Registered methods shipped with veridical (tests may register their own)."""
    return [n for n in list_methods() if method_class(n).__module__.startswith("veridical.")]


def rules_of_kind(kind: type) -> list[tuple[str, str, object]]:
    """``(method, parameter, rule)`` of every built-in hyper-parameter whose rule is ``kind`` (also
    inside ``Optional``)."""
    found = []
    for name in builtin_methods():
        for param, rule in hyperparameter_rules(method_class(name)).items():
            inner = rule.rule if isinstance(rule, Optional) else rule
            if isinstance(inner, kind):
                found.append((name, param, inner))
    return found


REALS = rules_of_kind(Real)
INTEGERS = rules_of_kind(Integer)


def ids(cases):
    return [f"{method}.{param}" for method, param, _ in cases]


# -- the rules themselves ------------------------------------------------------------------------------


def test_one_line_message_names_method_parameter_value_and_range():
    with pytest.raises(MethodSpecError) as err:
        Real(0).check("vcd", "alpha", math.nan)
    assert str(err.value) == "vcd: alpha must be a finite number >= 0, got nan"
    with pytest.raises(MethodSpecError) as err:
        Real(0, 1, low_open=True).check("avisc", "gamma", "abc")
    assert str(err.value) == "avisc: gamma must be a finite number in (0, 1], got 'abc'"
    with pytest.raises(MethodSpecError) as err:
        Integer(0, 999).check("vcd", "noise_step", 2.5)
    assert str(err.value) == "vcd: noise_step must be an integer in [0, 999], got 2.5"
    with pytest.raises(MethodSpecError) as err:
        Choice("noise", "blank").check("vcd", "contrast", "rotate")
    assert str(err.value) == "vcd: contrast must be one of noise, blank, got 'rotate'"


@pytest.mark.parametrize(
    ("rule", "text"),
    [
        (Real(0), "[0, inf)"),
        (Real(0, 1, low_open=True), "(0, 1]"),
        (Real(0, 1, low_open=True, high_open=True), "(0, 1)"),
        (Real(), "(-inf, inf)"),
        (Real(high=2.5), "(-inf, 2.5]"),
        (Integer(0, 999), "integer [0, 999]"),
        (Integer(1), "integer [1, inf)"),
        (Choice("noise", "blank", "no_image"), "noise|blank|no_image"),
        (Flag(), "true|false"),
        (Optional(Real(0, 1)), "[0, 1] or None"),
        (Layers(), "layer indices >= 0"),
        (Layers(negative=True, forms=(2,)), "layer indices | 'a,b'"),
        (Layers(forms=(2, 4)), "layer indices >= 0 | 'a,b' | 'a,b,c,d'"),
        (Custom(lambda v: True, "anything", "any"), "any"),
    ],
)
def test_describe(rule, text):
    assert rule.describe() == text


@pytest.mark.parametrize("value", NOT_NUMBERS)
def test_reals_refuse_non_finite_and_non_numbers(value):
    assert not Real().accepts(value)
    assert not Real(0, 1).accepts(value)


def test_real_bounds_and_ints():
    closed, open_ = Real(0, 1), Real(0, 1, low_open=True, high_open=True)
    assert closed.accepts(0) and closed.accepts(1) and closed.accepts(0.5)
    assert not closed.accepts(-1e-9) and not closed.accepts(1 + 1e-9)
    assert not open_.accepts(0) and not open_.accepts(1.0) and open_.accepts(1e-9) and open_.accepts(1 - 1e-9)
    assert Real(0).accepts(10**30) and not Real(0).accepts(-1)
    assert Real().accepts(-1e300)


def test_integers_refuse_floats_bools_and_out_of_range():
    rule = Integer(0, 999)
    assert rule.accepts(0) and rule.accepts(999)
    for bad in (-1, 1000, 2.0, 2.5, True, math.nan, math.inf, "3", None):
        assert not rule.accepts(bad), bad


def test_choice_flag_optional_layers_custom():
    assert Choice("a", "b").accepts("a") and not Choice("a", "b").accepts("c")
    assert not Choice(1, 2).accepts(True), "True == 1 but is not the choice 1"
    assert Flag().accepts(True) and Flag().accepts(False)
    for bad in (1, 0, "yes", "true", None):
        assert not Flag().accepts(bad)
    assert Optional(Flag()).accepts(None) and not Optional(Flag()).accepts("no")
    layers = Layers()
    assert layers.accepts(3) and layers.accepts([0, 2]) and layers.accepts((1,))
    for bad in ([], [-1], -1, [1.0], [True], "2,6", None, "x"):
        assert not layers.accepts(bad), bad
    official = Layers(negative=True, forms=(2,))
    assert official.accepts("25,30") and official.accepts("-3,-1") and official.accepts([-1])
    for bad in ("12", "1,2,3", "a,b", "", "2;3"):
        assert not official.accepts(bad), bad
    assert Layers(forms=(2, 4)).accepts("2,6,8,12") and not Layers(forms=(2, 4)).accepts("2,6,8")
    # A check that raises counts as a refusal, not as a crash.
    assert not Custom(lambda v: int(v) > 0, "positive", "> 0").accepts("x")


# -- every registered method ---------------------------------------------------------------------------


def test_every_hyperparameter_of_every_method_has_a_rule_and_its_default_passes():
    names = builtin_methods()
    assert {"vcd", "m3id", "avisc", "opera", "vista", "var", "vhr", "pai", "paint", "act"} <= set(names)
    for name in names:
        cls = method_class(name)
        params, rules = hyperparameters(cls), hyperparameter_rules(cls)
        assert set(rules) == set(params), f"{name}: parameters without a rule or rules without a parameter"
        for param, default in params.items():
            rules[param].check(name, param, default)


@pytest.mark.parametrize(("method", "param", "rule"), REALS, ids=ids(REALS))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "abc", True])
def test_validate_spec_refuses_non_finite_and_non_numbers_naming_the_parameter(method, param, rule, value):
    with pytest.raises(MethodSpecError) as err:
        validate_spec({"name": method, param: value})
    message = str(err.value)
    assert message.startswith(f"{method}: {param} must be ") and message.endswith(f"got {value!r}")
    assert "\n" not in message


@pytest.mark.parametrize(("method", "param", "rule"), INTEGERS, ids=ids(INTEGERS))
@pytest.mark.parametrize("value", [math.nan, math.inf, "abc", 2.5, False])
def test_validate_spec_refuses_non_integers(method, param, rule, value):
    with pytest.raises(MethodSpecError, match=f"^{method}: {param} must be an integer"):
        validate_spec({"name": method, param: value})


@pytest.mark.parametrize(("method", "param", "rule"), REALS, ids=ids(REALS))
def test_validate_spec_accepts_closed_bounds_and_refuses_open_ones(method, param, rule):
    for bound, is_open, inside in ((rule.low, rule.low_open, +1e-6), (rule.high, rule.high_open, -1e-6)):
        if math.isinf(bound):
            continue
        if is_open:
            with pytest.raises(MethodSpecError, match=param):
                validate_spec({"name": method, param: bound})
            validate_spec({"name": method, param: bound + inside})
        else:
            validate_spec({"name": method, param: bound})
            with pytest.raises(MethodSpecError, match=param):
                validate_spec({"name": method, param: bound - inside})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        # The documented ranges, written from each method's docstring and official code.
        ({"name": "vcd", "alpha": -0.1}, "vcd: alpha must be a finite number >= 0, got -0.1"),
        ({"name": "vcd", "beta": 1.5}, "vcd: beta must be a finite number in [0, 1], got 1.5"),
        ({"name": "vcd", "noise_step": 1000}, "vcd: noise_step must be an integer in [0, 999], got 1000"),
        (
            {"name": "vcd", "contrast": "rotate"},
            "vcd: contrast must be one of noise, blank, no_image, got 'rotate'",
        ),
        ({"name": "m3id", "alpha": 1.5}, "m3id: alpha must be a finite number in [0, 1], got 1.5"),
        ({"name": "avisc", "gamma": 0}, "avisc: gamma must be a finite number in (0, 1], got 0"),
        ({"name": "opera", "scale": 0}, "opera: scale must be a finite number > 0, got 0"),
        ({"name": "opera", "num_candidates": 0}, "opera: num_candidates must be an integer >= 1, got 0"),
        ({"name": "opera", "threshold": -1}, "opera: threshold must be an integer >= 0, got -1"),
        (
            {"name": "vista", "logits_alpha": 2},
            "vista: logits_alpha must be a finite number in [0, 1], got 2",
        ),
        ({"name": "var", "p": 1.5}, "var: p must be a finite number in [0, 1], got 1.5"),
        ({"name": "pai", "gamma": 0.5}, "pai: gamma must be a finite number >= 1, got 0.5"),
        ({"name": "paint", "local_ratio": 0}, "paint: local_ratio must be a finite number in (0, 1], got 0"),
        ({"name": "act", "threshold": 1}, "act: threshold must be a finite number in (0, 1), got 1"),
        (
            {"name": "pai", "boost_prefill": "yes"},
            "pai: boost_prefill must be true or false or None, got 'yes'",
        ),
    ],
)
def test_documented_ranges(spec, message):
    with pytest.raises(MethodSpecError) as err:
        validate_spec(spec)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "vista", "layers": "2,6,8"},
        {"name": "vista", "logits_layers": "12"},
        {"name": "vista", "official_pca": "yes"},
        {"name": "var", "sink_dims": "some"},
        {"name": "var", "sink_dims": [0, -1]},
        {"name": "act", "heads": "no/such/heads.json"},
        {"name": "act", "heads": {1: [-1]}},
        {"name": "vhr", "head_scales": "no/such/scales.pt"},
        {"name": "pai", "layers": []},
        {"name": "opera", "max_rollbacks": -1},
        {"name": "vcd", "seed": 1.5},
    ],
)
def test_structured_values_are_checked_before_any_model(spec):
    param = next(k for k in spec if k != "name")
    with pytest.raises(MethodSpecError, match=f"^{spec['name']}: {param} must be"):
        validate_spec(spec)


def test_structured_values_that_need_the_model_pass_validation(tmp_path):
    heads = tmp_path / "heads.json"
    heads.write_text('{"heads": {"2": [0]}}')
    for spec in (
        {"name": "vista", "layers": "2,6,8,12", "logits_layers": "-3,-1"},
        {"name": "vista", "layers": [0, 1], "logits_layers": [2]},
        {"name": "var", "sink_dims": [2533, 1415]},
        {"name": "var", "sink_dims": "auto"},
        {"name": "act", "heads": str(heads)},
        {"name": "act", "heads": {"2": [0, 3], 5: []}},
        {"name": "pai", "layers": 3},
        {"name": "opera", "max_rollbacks": 0, "preset": "fast"},
        {"name": "vcd", "seed": -(2**63)},
    ):
        validate_spec(spec)


@pytest.fixture(scope="module")
def llava(tiny_models):
    from veridical.tiny import tiny_inputs

    model, processor = tiny_models("llava")
    return model, tiny_inputs("llava", processor, ["what is this ?"])


@pytest.mark.parametrize(("method", "param", "rule"), REALS, ids=ids(REALS))
def test_constructors_refuse_what_validation_refuses(llava, method, param, rule):
    """``VCD(model, inputs, alpha=nan)`` refuses as ``validate_spec`` does: every constructor runs the
    rules itself (called directly here, not through ``build_method``)."""
    model, inputs = llava
    with pytest.raises(MethodSpecError, match=f"^{method}: {param} must be"):
        method_class(method)(model, inputs, **{param: math.nan})


def test_build_method_checks_values_before_building(llava):
    model, inputs = llava
    with pytest.raises(MethodSpecError, match="^vcd: alpha must be a finite number >= 0, got inf$"):
        build_method({"name": "vcd", "alpha": math.inf}, model, inputs)


# -- command-line specs and stacks ---------------------------------------------------------------------


def test_command_line_numbers_in_exponent_form_and_none():
    # YAML 1.1 reads "1e-3" as a string; a hyper-parameter written so is a number.
    assert parse_method_spec("m3id:lam=1e-3") == {"name": "m3id", "lam": 0.001}
    assert parse_method_spec("vcd:alpha=1e+3,seed=None") == {"name": "vcd", "alpha": 1000.0, "seed": None}
    assert parse_method_spec("vcd:alpha='1e3'") == {"name": "vcd", "alpha": "1e3"}, "quoted stays a string"
    with pytest.raises(MethodSpecError, match="^vcd: alpha must be a finite number >= 0, got 'abc'$"):
        validate_spec(parse_method_spec("vcd:alpha=abc"))
    with pytest.raises(MethodSpecError, match="^vcd: alpha must be a finite number >= 0, got nan$"):
        validate_spec(parse_method_spec("vcd:alpha=.nan"))


@pytest.mark.parametrize(
    ("text", "specs"),
    [
        ("vanilla", []),
        (" vanilla ", []),
        ("vcd", ["vcd"]),
        ("var+vcd:alpha=2", ["var", {"name": "vcd", "alpha": 2}]),
        ("var + vcd", ["var", "vcd"]),
        ("vcd:alpha=1e+3", [{"name": "vcd", "alpha": 1000.0}]),
        ("vcd:alpha=1e+3+var", [{"name": "vcd", "alpha": 1000.0}, "var"]),
        ("act:heads='a+b.json'+vcd", [{"name": "act", "heads": "a+b.json"}, "vcd"]),
        ('act:heads="a+vcd"', [{"name": "act", "heads": "a+vcd"}]),
        ('{"name": "act", "heads": "x+vcd"}+pai', [{"name": "act", "heads": "x+vcd"}, "pai"]),
        (
            "vista:layers=[1,2]+vcd:contrast=blank",
            [{"name": "vista", "layers": [1, 2]}, {"name": "vcd", "contrast": "blank"}],
        ),
        ('vista:layers="2,6"+vcd', [{"name": "vista", "layers": "2,6"}, "vcd"]),
    ],
)
def test_parse_method_stack(text, specs):
    assert parse_method_stack(text) == specs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("vcd++var", "empty method"),
        ("+vcd", "empty method"),
        ("vcd+", "empty method"),
        ("", "empty method"),
        ("vanilla+vcd", "'vanilla' means no method"),
    ],
)
def test_parse_method_stack_errors(text, message):
    with pytest.raises(MethodSpecError, match=message):
        parse_method_stack(text)


# -- the torch-free listing ----------------------------------------------------------------------------


def test_methods_json_is_what_the_registry_generates():
    shipped = json.loads(catalog.MANIFEST.read_text(encoding="utf-8"))
    assert shipped == catalog.build_manifest(), (
        f"{catalog.MANIFEST} is stale; regenerate it with: {catalog.REGENERATE}"
    )


def test_format_methods_shows_defaults_and_ranges():
    text = catalog.format_methods()
    blocks = {block.split()[0]: block for block in text.split("\n\n")}
    assert set(blocks) == set(builtin_methods())
    assert blocks["vcd"].splitlines()[0] == "vcd  Visual Contrastive Decoding."
    lines = [line.split() for line in blocks["vcd"].splitlines()[1:]]
    assert lines[0] == ["alpha=1.0", "[0,", "inf)"]
    assert lines[1] == ["beta=0.1", "[0,", "1]"]
    assert lines[2] == ["noise_step=500", "integer", "[0,", "999]"]
    assert lines[3] == ["contrast='noise'", "noise|blank|no_image"]
    assert "gamma=0.5  (0, 1]" in blocks["avisc"]
    assert "official_pca=True   true|false" in blocks["vista"]


def test_listing_and_registry_import_no_torch_and_registry_loads_the_methods_itself():
    """``veridical methods`` must start fast: the listing never imports torch; the registry imports
    the built-in methods on first use (with a lazy ``import veridical``)."""
    code = (
        "import sys\n"
        "import veridical.catalog, veridical.registry\n"
        "text = veridical.catalog.format_methods()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "names = veridical.registry.list_methods()\n"
        "print(','.join(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert set(out.stdout.strip().split(",")) == set(builtin_methods())
