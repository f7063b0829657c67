"""The pass contracts: what each pass requires and ensures, the pipeline's check of them, the named
pipelines, the one module that owns the meta keys, and no pass branching on a backend's name."""

import ast
import pathlib
import warnings

import pytest
import torch
from torch import fx, nn

import fraccompile
from fraccompile import PassError
from fraccompile import meta_keys as mk
from fraccompile.capture import capture
from fraccompile.passes import PASSES, PIPELINES, check_order, get_pass, get_pipeline, run_passes

PACKAGE = pathlib.Path(fraccompile.__file__).parent


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head((h + self.conv(h)).mean((2, 3)))


X = torch.randn(2, 3, 6, 6)


def test_every_pass_declares_known_properties():
    for name, cls in PASSES.items():
        declared = cls.requires | cls.ensures | cls.invalidates
        assert cls.ensures, name
        assert declared <= set(mk.PROPERTIES), (name, declared - set(mk.PROPERTIES))
    assert set(mk.CAPTURED) <= set(mk.PROPERTIES)


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_named_pipeline_meets_its_requirements(name):
    have = check_order(get_pipeline(name), mk.CAPTURED)
    assert {mk.SITES, mk.MACS} <= have  # what .sites and .cost() read


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_named_pipeline_compiles_a_model_with_sites_and_cost(name):
    fm = fraccompile.compile(Net(), X, pipeline=name, a=4, w=4, g=8)
    sites = {s.name: s for s in fm.sites}
    assert set(sites) == {"stem", "conv", "head"} and not sites["conv"].full_precision
    assert sites["conv"].macs == 2 * 4 * 36 * 4 * 9
    cost = fm.cost()
    assert 0 < cost.cp < 1
    assert fm.meta[mk.GM_PROPERTIES] == check_order(get_pipeline(name), mk.CAPTURED)
    y = fm(X)
    assert torch.isfinite(y).all() and y.shape == (2, 2)


def test_cost_only_pipeline_is_gone():
    """It ran cost-annotation alone, which needs quantize-insertion's sites: `.sites` and
    `.cost()` failed on its result. The names offered are the pipelines that exist."""
    assert "cost-only" not in PIPELINES
    with pytest.raises(PassError, match="unknown pipeline 'cost-only': valid pipelines are default, dfq"):
        fraccompile.compile(Net(), X, pipeline="cost-only")


def test_an_order_that_misses_a_requirement_names_it_and_its_provider():
    with pytest.raises(PassError) as err:
        check_order([get_pass("cost-annotation")], mk.CAPTURED, what="pipeline 'mine'")
    msg = str(err.value)
    assert msg.startswith("pipeline 'mine': pass 'cost-annotation' requires 'sites'")
    assert "run 'quantize-insertion' before it" in msg
    with pytest.raises(PassError, match="'gating-insertion' requires 'regions'"):
        check_order([get_pass(n) for n in ("quantize-insertion", "gating-insertion")])


def test_run_passes_checks_before_running():
    gm = capture(Net(), X)
    code = gm.code
    with pytest.raises(PassError, match="'cost-annotation' requires 'sites'"):
        run_passes(gm, [get_pass("cost-annotation")])
    assert gm.code == code
    gm = run_passes(gm, [get_pass("quantize-insertion")])
    assert gm.meta[mk.GM_PROPERTIES] == {mk.SHAPES, mk.SITES}
    gm = run_passes(gm, [get_pass("cost-annotation")])  # resumes from the recorded properties
    assert gm.meta[mk.GM_PROPERTIES] == {mk.SHAPES, mk.SITES, mk.MACS}


def test_a_graph_without_shapes_is_refused():
    gm = fx.symbolic_trace(Net())  # no shape propagation
    with pytest.raises(PassError, match="'quantize-insertion' requires 'shapes'.*capture provides"):
        run_passes(gm, [get_pass("quantize-insertion")])


def test_invalidated_properties_are_dropped():
    passes = [get_pass(n) for n in ("quantize-insertion", "region-discovery", "epilogue-fusion")]
    have = check_order(passes)
    assert mk.REGIONS not in have and mk.EPILOGUES in have
    with pytest.raises(PassError, match="'gating-insertion' requires 'regions'"):
        check_order([*passes, get_pass("gating-insertion")])


def _meta_literal_uses(path: pathlib.Path) -> list[str]:
    """``x.meta[<str>]``, ``x.meta.get(<str>)``, ``.pop``, ``.setdefault`` with a literal key."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        key = None
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "meta"
        ):
            key = node.slice
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "pop", "setdefault")
            and node.args
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "meta"
        ):
            key = node.args[0]
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            out.append(f"{path.name}:{node.lineno}: {key.value!r}")
    return out


def test_meta_keys_have_one_owner():
    """The passes, capture, compile, the model and the report name every meta key through
    fraccompile.meta_keys (no string literal), and no pass module defines a key of its own."""
    files = [
        *sorted((PACKAGE / "passes").glob("*.py")),
        PACKAGE / "capture.py",
        PACKAGE / "capture_modes.py",
        PACKAGE / "api.py",
        PACKAGE / "model.py",
        PACKAGE / "report.py",
    ]
    uses = [u for f in files for u in _meta_literal_uses(f)]
    assert uses == []
    values = [v for k, v in vars(mk).items() if k.isupper() and isinstance(v, str)]
    assert len(values) == len(set(values))
    for f in sorted((PACKAGE / "passes").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        assert not t.id.startswith(("META_", "GM_")), f"{f.name}: {t.id}"


def test_no_pass_branches_on_a_backend_name():
    """Passes adapt to a backend through its capabilities (fraccompile.ops.backend), never by
    comparing ``config.backend`` with a name."""
    found = []
    for f in sorted((PACKAGE / "passes").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "backend" for s in sides):
                found.append(f"{f.name}:{node.lineno}")
    assert found == []


def test_passes_do_not_warn_on_a_plain_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = capture(Net(), X)
        run_passes(gm, get_pipeline("dfq"))
