"""Train/eval behaviour of a captured graph.

Tracing evaluates ``self.training``: ``F.dropout(x, p, training=self.training)`` is captured with
``training=True`` baked in, and torch.export's training IR bakes BatchNorm's and dropout's mode into
``aten.batch_norm`` / ``aten.dropout``. :func:`merge_modes` compares the graph captured in train mode
with the one captured in eval mode, node by node (difflib alignment of the node sequences):

* an argument that is a different constant in the two graphs becomes
  ``self.frac_mode(train_value, eval_value)``, a :class:`ModeSwitch` node that returns one or the
  other by the compiled module's ``training`` flag;
* a node only the train graph has, whose result nothing reads and that mutates in place (the
  ``num_batches_tracked.add_(1)`` of a training BatchNorm) runs only in training
  (:func:`run_in_training`);
* any other difference is *structural* (``if self.training: ...`` around different ops): the
  module paths of those nodes are returned, for capture to keep opaque (fx) or to report.
"""

from __future__ import annotations

import difflib

from torch import fx, nn

from .meta_keys import NN_MODULE_STACK

MODE_MODULE = "frac_mode"


class ModeSwitch(nn.Module):
    """``frac_mode(train_value, eval_value)``: the value for the module's current mode."""

    def forward(self, train_value, eval_value):
        return train_value if self.training else eval_value


def run_in_training(training: bool, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in training, nothing in eval (a train-only side effect)."""
    if training:
        return fn(*args, **kwargs)
    return None


def _target(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__qualname__", None) or str(t)


def _sig(node: fx.Node) -> tuple:
    return (node.op, _target(node), len(node.args), tuple(sorted(node.kwargs)))


class _Structural(Exception):
    pass


def _diff_args(a, b, mapping: dict, out: list, where: tuple) -> None:
    """Walk two argument structures: nodes must correspond, differing constants are recorded."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or mapping.get(b) is not a:
            raise _Structural
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and type(a) is type(b):
        if len(a) != len(b):
            raise _Structural
        for i, (x, y) in enumerate(zip(a, b)):
            _diff_args(x, y, mapping, out, where + (i,))
        return
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            raise _Structural
        for k in a:
            _diff_args(a[k], b[k], mapping, out, where + (k,))
        return
    if type(a) is not type(b) or a != b:
        out.append((where, a, b))


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get(NN_MODULE_STACK)
    if node.op == "call_module":
        return str(node.target)
    return list(stack.values())[-1][0] if stack else ""


def _in_place(node: fx.Node) -> bool:
    name = _target(node).split(".")
    base = name[-2] if len(name) > 1 and name[-1] in ("default", "Tensor", "Scalar") else name[-1]
    return base.endswith("_") and not base.startswith("_")


def _replace(value, path: tuple, new):
    if not path:
        return new
    head, *rest = path
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], tuple(rest), new)}
    items = list(value)
    items[head] = _replace(items[head], tuple(rest), new)
    return type(value)(items)


def merge_modes(train: fx.GraphModule, eval_: fx.GraphModule) -> list[str]:
    """Make ``train``'s mode-dependent constants and train-only side effects follow the module's
    mode (in place). Returns the module paths of structural differences (empty: merged)."""
    tn = [n for n in train.graph.nodes]
    en = [n for n in eval_.graph.nodes]
    mapping: dict[fx.Node, fx.Node] = {}
    diffs: list[tuple[fx.Node, tuple, object, object]] = []
    train_only: list[fx.Node] = []
    structural: list[str] = []
    ops = difflib.SequenceMatcher(
        None, [_sig(n) for n in tn], [_sig(n) for n in en], autojunk=False
    ).get_opcodes()
    for tag, i1, i2, j1, j2 in ops:
        if tag == "equal":
            for a, b in zip(tn[i1:i2], en[j1:j2]):
                found: list = []
                try:
                    _diff_args((a.args, a.kwargs), (b.args, b.kwargs), mapping, found, ())
                except _Structural:
                    structural.append(_module_path(a))
                mapping[b] = a
                diffs += [(a, where, tv, ev) for where, tv, ev in found]
            continue
        for a in tn[i1:i2]:
            if tag == "delete" and not a.users and a.op == "call_function" and _in_place(a):
                train_only.append(a)
            else:
                structural.append(_module_path(a))
        structural += [_module_path(b) for b in en[j1:j2]]
    if structural:
        return sorted(set(structural))
    if not diffs and not train_only:
        return []
    graph = train.graph
    if not hasattr(train, MODE_MODULE):
        train.add_submodule(MODE_MODULE, ModeSwitch())
    for node, where, tv, ev in diffs:
        with graph.inserting_before(node):
            switch = graph.create_node("call_module", MODE_MODULE, (tv, ev), {}, name="frac_mode")
        args, kwargs = _replace((node.args, node.kwargs), where, switch)
        node.args, node.kwargs = args, kwargs
    for node in train_only:
        with graph.inserting_before(node):
            flag = graph.create_node("call_module", MODE_MODULE, (True, False), {}, name="frac_training")
            new = graph.call_function(run_in_training, (flag, node.target, *node.args), dict(node.kwargs))
        new.meta.update(node.meta)
        graph.erase_node(node)
    train.recompile()
    return []
