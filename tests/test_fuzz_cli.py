"""Fuzz: random method specs, hyper-parameter values and ``veridical eval`` argument lists.

Whatever the input, the command either runs (and then its outputs are not all empty) or exits with
one ``veridical: error:`` line: no traceback, and no folder left behind that would block the
corrected run. Examples are derandomised (the same on every run) so a failure reproduces.
"""

import json
import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.test_eval_cli import pope_args
from veridical.cli import main
from veridical.errors import VeridicalError
from veridical.registry import hyperparameters, list_methods, method_class, parse_method_spec, validate_spec

NAMES = list_methods()
VALUES = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 0.5, 1.0, 2.0, 1e9, -1e9]),
    st.integers(-3, 40),
    st.sampled_from(["abc", "", "noise", "blank", "no_image", "paper", "auto", "2,6", "[1, 2]", "None"]),
    st.booleans(),
    st.none(),
    st.lists(st.integers(-2, 40), max_size=3),
)


@st.composite
def method_spec(draw) -> dict:
    name = draw(st.sampled_from([*NAMES, "vdc", "VCD", ""]))
    known = list(hyperparameters(method_class(name))) if name in NAMES else []
    keys = draw(st.lists(st.sampled_from([*known, "alhpa", "name2"]), max_size=3, unique=True))
    return {"name": name, **{k: draw(VALUES) for k in keys}}


def spec_text(spec: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(spec)
    params = ",".join(
        f"{k}={json.dumps(v) if isinstance(v, (list, str)) else v}" for k, v in spec.items() if k != "name"
    )
    return f"{spec['name']}:{params}" if params else spec["name"]


@settings(max_examples=200, derandomize=True, deadline=None)
@given(spec=method_spec(), as_json=st.booleans())
def test_a_spec_is_valid_or_refused_with_a_veridical_error(spec, as_json):
    try:
        validate_spec(parse_method_spec(spec_text(spec, as_json)))
    except VeridicalError as err:
        assert "\n" not in str(err)


@st.composite
def eval_argv(draw) -> list[str]:
    extra = []
    if draw(st.booleans()):
        spec = draw(method_spec())
        stack = spec_text(spec, draw(st.booleans()))
        if draw(st.booleans()):
            stack = f"{draw(st.sampled_from(['vhr', 'pai', 'vanilla', 'nope']))}+{stack}"
        extra += ["--method", stack]
    options = {
        "--limit": st.sampled_from(["1", "2", "0", "-1", "x"]),
        "--batch-size": st.sampled_from(["1", "2", "0", "-2"]),
        "--num-beams": st.sampled_from(["1", "2", "0"]),
        "--max-new-tokens": st.sampled_from(["1", "2", "0", "2.5"]),
        "--temperature": st.sampled_from(["0.7", "0", "-1", "nan", "inf"]),
        "--top-p": st.sampled_from(["0.9", "0", "1.5"]),
        "--gen": st.sampled_from(
            ["top_k=0", "top_k=-1", "foo=1", "repetition_penalty=1.5", "no_eq", "min_p=nan"]
        ),
        "--protocol": st.sampled_from(["llava", "vcd", "opera", "nope"]),
        "--rule": st.sampled_from(["llava", "vcd", "bad"]),
        "--seed": st.sampled_from(["0", "7", "-5"]),
        "--dtype": st.sampled_from(["float32", "auto", "float8"]),
        "--device": st.sampled_from(["cpu", "cuda", "bogus"]),
    }
    for flag in draw(st.lists(st.sampled_from(sorted(options)), max_size=4, unique=True)):
        extra += [flag, draw(options[flag])]
    if draw(st.booleans()):
        extra.append(draw(st.sampled_from(["--do-sample", "--no-do-sample"])))
    if "--limit" not in extra:
        extra += ["--limit", "2"]
    return extra


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(extra=eval_argv())
def test_eval_runs_or_exits_with_one_error_line(model_dir, dataset, fuzz_root, capsys, extra):
    out = fuzz_root / f"run{len(list(fuzz_root.iterdir()))}"
    argv = pope_args(model_dir, dataset, out, *extra)  # a repeated option: the last one counts
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    event(f"exit status {code}")  # --hypothesis-show-statistics: how many ran, how many were refused
    assert "Traceback" not in err
    if code == 0:
        outputs = [
            json.loads(line)["output"] for line in (out / "samples.rank0.jsonl").read_text().splitlines()
        ]
        assert any(outputs) and (out / "results.json").exists()
        return
    assert code == 2, (argv, err)
    lines = [line for line in err.splitlines() if line.startswith("veridical:")]
    assert len(lines) == 1 and lines[0].startswith("veridical: error:"), err
    assert not out.exists() or not any(p.stat().st_size for p in out.glob("samples.rank*.jsonl"))
