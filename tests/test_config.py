"""FracConfig: validation (a bad field raises ConfigError naming it), dict and TOML round-trips."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fraccompile import ConfigError, FracConfig
from fraccompile.config import (
    BACKENDS,
    CAPTURE_METHODS,
    CONFIG_VERSION,
    OP_KINDS,
    RECOMPUTE_LEVELS,
    ROUNDING_NOISES,
    SCHEMES,
    WEIGHT_SCALES,
)

FIELDS = sorted(f.name for f in dataclasses.fields(FracConfig))

NON_DEFAULT = FracConfig(
    a=4,
    w=6,
    g=0,
    scheme="symmetric",
    full_precision=("layer1.*", "@first_conv"),
    ops=("conv", "matmul"),
    backend="tvm",
    capture="export",
    leaf_modules=("ValueGate", "blocks.0.attn"),
    pipeline="default",
    act_momentum=0.25,
    weight_scale="tensor",
    rounding_noise="counter",
    recompute="norms",
    recompute_budget=0.4,
)


# -- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["a", "w", "g"])
@pytest.mark.parametrize("value", [1, 17, -1, 100, True, False, 4.0, "8", None, 2.5])
def test_bad_bits_raise_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"FracConfig\.{field}\b") as info:
        FracConfig(**{field: value})
    assert "16" in str(info.value)  # names the allowed range


@pytest.mark.parametrize("field", ["a", "w", "g"])
@pytest.mark.parametrize("value", [0, 2, 3, 8, 12, 16])
def test_good_bits_accepted(field, value):
    assert getattr(FracConfig(**{field: value}), field) == value


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("scheme", "asymmetric", SCHEMES),
        ("scheme", "SBM", SCHEMES),
        ("backend", "cuda", BACKENDS),
        ("capture", "dynamo", CAPTURE_METHODS),
        ("weight_scale", "row", WEIGHT_SCALES),
        ("rounding_noise", "philox", ROUNDING_NOISES),
        ("recompute", "all", RECOMPUTE_LEVELS),
    ],
)
def test_unknown_choice_raises_naming_field_and_choices(field, value, allowed):
    with pytest.raises(ConfigError, match=rf"FracConfig\.{field}\b") as info:
        FracConfig(**{field: value})
    msg = str(info.value)
    assert repr(value) in msg
    assert all(a in msg for a in allowed), msg


@pytest.mark.parametrize("value", [-0.1, 1.5, True, "0.5", None])
def test_bad_recompute_budget_raises(value):
    with pytest.raises(ConfigError, match=r"FracConfig\.recompute_budget") as info:
        FracConfig(recompute="norms", recompute_budget=value)
    assert "0 <= recompute_budget <= 1" in str(info.value)


def test_recompute_budget_needs_something_recomputed():
    needs = r"recompute_budget = 0\.5 needs recompute='activations' or 'norms'"
    with pytest.raises(ConfigError, match=needs):
        FracConfig(recompute="none", recompute_budget=0.5)
    assert FracConfig(recompute="none", recompute_budget=0).recompute_budget == 0.0
    for level in ("activations", "norms"):
        assert FracConfig(recompute=level, recompute_budget=1).recompute_budget == 1.0
        assert isinstance(FracConfig(recompute=level, recompute_budget=1).recompute_budget, float)


@pytest.mark.parametrize("ops", [("conv", "attention"), ("bmm",), ("Linear",)])
def test_unknown_op_raises(ops):
    with pytest.raises(ConfigError, match=r"FracConfig\.ops") as info:
        FracConfig(ops=ops)
    assert all(k in str(info.value) for k in OP_KINDS)


@pytest.mark.parametrize("field", ["ops", "full_precision", "leaf_modules"])
@pytest.mark.parametrize("value", ["conv", [1, 2], ("conv", None)])
def test_string_lists_are_checked(field, value):
    with pytest.raises(ConfigError, match=rf"FracConfig\.{field}"):
        FracConfig(**{field: value})


@pytest.mark.parametrize("value", [0, 0.0, 2, 1.5, -0.1, True, "0.1", None])
def test_bad_act_momentum_raises(value):
    with pytest.raises(ConfigError, match=r"FracConfig\.act_momentum"):
        FracConfig(act_momentum=value)


@pytest.mark.parametrize("value", [1e-6, 0.1, 0.5, 1.0, 1])
def test_good_act_momentum(value):
    assert FracConfig(act_momentum=value).act_momentum == value


@pytest.mark.parametrize("value", ["", None, 3])
def test_bad_pipeline_raises(value):
    with pytest.raises(ConfigError, match=r"FracConfig\.pipeline"):
        FracConfig(pipeline=value)


@pytest.mark.parametrize("value", [0, 2, "1"])
def test_unsupported_version_raises(value):
    with pytest.raises(ConfigError, match=r"FracConfig\.version"):
        FracConfig(version=value)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        FracConfig(a=1)


def test_config_is_frozen_and_replace_revalidates():
    cfg = FracConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.a = 4  # type: ignore[misc]
    assert cfg.replace(a=4).a == 4 and cfg.a == 8
    with pytest.raises(ConfigError, match=r"FracConfig\.w"):
        cfg.replace(w=99)


def test_lists_are_normalized_to_tuples():
    cfg = FracConfig(full_precision=["a.*"], ops=["conv"], leaf_modules=["X"])
    assert cfg.full_precision == ("a.*",) and cfg.ops == ("conv",) and cfg.leaf_modules == ("X",)
    assert cfg == FracConfig(full_precision=("a.*",), ops=("conv",), leaf_modules=("X",))
    hash(cfg)


# -- from_dict -------------------------------------------------------------------------------------
def test_from_dict_unknown_keys_list_the_valid_fields():
    with pytest.raises(ConfigError) as info:
        FracConfig.from_dict({"a": 4, "bits": 8, "sheme": "sbm"})
    msg = str(info.value)
    assert "bits" in msg and "sheme" in msg
    assert all(f in msg for f in FIELDS), msg


@pytest.mark.parametrize("data", [[("a", 4)], "a=4", None, 3])
def test_from_dict_rejects_non_tables(data):
    with pytest.raises(ConfigError):
        FracConfig.from_dict(data)


def test_from_dict_validates_values():
    with pytest.raises(ConfigError, match=r"FracConfig\.a"):
        FracConfig.from_dict({"a": 99})


def test_saved_config_from_before_rounding_noise_keeps_torch_noise():
    """A to_dict() written before ``rounding_noise`` existed (it carries ``version``) meant
    torch.rand noise; a hand-written table without it takes today's default, counter noise."""
    saved = FracConfig().to_dict()
    del saved["rounding_noise"]
    assert FracConfig.from_dict(saved).rounding_noise == "torch"
    assert FracConfig.from_dict({"a": 4}).rounding_noise == "counter" == FracConfig().rounding_noise


def test_from_dict_of_partial_table_uses_defaults():
    assert FracConfig.from_dict({"a": 4}) == FracConfig(a=4)
    assert FracConfig.from_dict({}) == FracConfig()


# -- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [
        FracConfig(),
        NON_DEFAULT,
        FracConfig(full_precision=(), ops=("linear",), act_momentum=1),
        FracConfig(leaf_modules=('we"ird\\name', "tab\there", "ünï")),
    ],
    ids=["default", "non_default", "empty_lists", "escapes"],
)
def test_dict_and_toml_round_trips(cfg, tmp_path):
    d = cfg.to_dict()
    assert d["version"] == CONFIG_VERSION and sorted(d) == FIELDS
    assert FracConfig.from_dict(d) == cfg
    text = cfg.to_toml()
    assert text.startswith("[fraccompile]")
    assert FracConfig.from_toml(text) == cfg
    path = tmp_path / "frac.toml"
    cfg.save(path)
    assert path.read_text() == text
    assert FracConfig.load(path) == cfg
    assert FracConfig.load(str(path)) == cfg


def test_non_default_round_trip_keeps_every_field():
    back = FracConfig.from_toml(NON_DEFAULT.to_toml())
    for name in FIELDS:
        assert getattr(back, name) == getattr(NON_DEFAULT, name), name
        assert type(getattr(back, name)) is type(getattr(NON_DEFAULT, name)), name


def test_to_dict_is_json_friendly_and_a_copy():
    d = NON_DEFAULT.to_dict()
    assert isinstance(d["ops"], list) and isinstance(d["full_precision"], list)
    d["ops"].append("linear")
    assert NON_DEFAULT.ops == ("conv", "matmul")


configs = st.builds(
    FracConfig,
    a=st.sampled_from([0, *range(2, 17)]),
    w=st.sampled_from([0, *range(2, 17)]),
    g=st.sampled_from([0, *range(2, 17)]),
    scheme=st.sampled_from(SCHEMES),
    full_precision=st.lists(
        st.text(
            st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\x7f"), max_size=12
        ),
        max_size=3,
    ).map(tuple),
    ops=st.lists(st.sampled_from(OP_KINDS), unique=True, max_size=3).map(tuple),
    backend=st.sampled_from(BACKENDS),
    capture=st.sampled_from(CAPTURE_METHODS),
    leaf_modules=st.lists(st.from_regex(r"[A-Za-z_][A-Za-z0-9_.*]{0,15}", fullmatch=True), max_size=3).map(
        tuple
    ),
    act_momentum=st.floats(1e-9, 1.0, exclude_min=False),
)


@settings(max_examples=150, deadline=None)
@given(cfg=configs)
def test_round_trip_property(cfg):
    assert FracConfig.from_dict(cfg.to_dict()) == cfg
    assert FracConfig.from_toml(cfg.to_toml()) == cfg


@pytest.mark.parametrize("name", ["line\nbreak", "ctl\x01char", "del\x7f"])
def test_toml_round_trip_with_control_characters(name):
    cfg = FracConfig(full_precision=(name,))
    assert FracConfig.from_toml(cfg.to_toml()) == cfg


# -- TOML input ------------------------------------------------------------------------------------
def test_toml_bare_table_and_section_both_accepted():
    assert FracConfig.from_toml("a = 4\nscheme = 'symmetric'\n") == FracConfig(a=4, scheme="symmetric")
    assert FracConfig.from_toml("[fraccompile]\na = 4\n") == FracConfig(a=4)
    assert FracConfig.from_toml("") == FracConfig()


@pytest.mark.parametrize("text", ["a = ", "[fraccompile\na = 4", "a = 4\na = 5", "a = 'x", "= 3"])
def test_toml_syntax_error_raises_config_error(text):
    with pytest.raises(ConfigError, match="TOML"):
        FracConfig.from_toml(text)


@pytest.mark.parametrize(
    "text, field",
    [
        ("a = 99", "FracConfig.a"),
        ("scheme = 'int4'", "FracConfig.scheme"),
        ("[fraccompile]\nact_momentum = 0", "FracConfig.act_momentum"),
        ("[fraccompile]\nops = ['conv', 'rnn']", "FracConfig.ops"),
    ],
)
def test_toml_bad_values_raise_naming_the_field(text, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        FracConfig.from_toml(text)


def test_toml_unknown_key_lists_valid_fields():
    with pytest.raises(ConfigError, match="unknown FracConfig field") as info:
        FracConfig.from_toml("[fraccompile]\nbits = 4\n")
    assert all(f in str(info.value) for f in FIELDS)


def test_load_missing_file_raises_config_error(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        FracConfig.load(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ConfigError):
        FracConfig.load(tmp_path)  # a directory is not a config file


def test_load_syntax_error_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[fraccompile]\na = = 4\n")
    with pytest.raises(ConfigError, match="TOML"):
        FracConfig.load(path)


def test_extras_match_pyproject_and_missing_ones_say_how_to_install(monkeypatch):
    """The `tune` extra (TVM's RPC tracker/server, MetaSchedule's xgboost) is optional: the core
    dependencies do not pull it, errors.EXTRAS lists what pyproject installs, and a code path that
    needs a missing module says which and the pip command."""
    import pathlib
    import sys

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from fraccompile.errors import EXTRAS, MissingDependencyError, require_extra

    meta = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    project = meta["project"]
    assert list(EXTRAS["tune"]) == project["optional-dependencies"]["tune"]
    core = " ".join(project["dependencies"])
    assert not any(name in core for name in EXTRAS["tune"])
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    license_text = (pathlib.Path(__file__).parents[1] / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text

    monkeypatch.setitem(sys.modules, "xgboost", None)  # import xgboost -> ImportError
    with pytest.raises(MissingDependencyError) as err:
        require_extra("tune", "--metaschedule", ("xgboost",))
    assert str(err.value) == (
        "--metaschedule needs xgboost (the 'tune' extra), which is not "
        "installed: pip install 'fraccompile[tune]' (from a checkout: "
        "pip install -e '.[tune]')"
    )
    assert isinstance(err.value, ImportError)
    require_extra("tune", "numpy", ("numpy",))  # present: no error
