"""Zoo models built from configs (no weights downloaded), where the packages install here:
transformers (``pip install --no-deps transformers`` plus its small pure-Python deps: it must not
pull a CUDA torch). timm and torchvision do not import with the CPU torch wheel: those tests skip.
Slow (model export): ``python -m pytest -m slow tests/test_models_zoo.py``."""

import copy
import warnings

import pytest
import torch

import fraccompile
from fraccompile import FracConfig

pytestmark = pytest.mark.slow
FP = dict(a=0, w=0, g=0)


class _Wrap(torch.nn.Module):
    def __init__(self, model, seq2seq=False):
        super().__init__()
        self.model, self.seq2seq = model, seq2seq

    def forward(self, ids):
        kw = {"decoder_input_ids": ids} if self.seq2seq else {}
        return self.model(input_ids=ids, **kw)[0]


def _hf(name, dropout=0.1):
    tr = pytest.importorskip("transformers")
    small = dict(vocab_size=64)
    if name == "gpt2":
        small.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    elif name == "bert":
        small.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    else:
        small.update(dropout_rate=dropout)
    if name == "gpt2":
        return _Wrap(
            tr.GPT2LMHeadModel(tr.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **small))
        )
    if name == "bert":
        return _Wrap(
            tr.BertModel(
                tr.BertConfig(
                    hidden_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=64,
                    max_position_embeddings=64,
                    **small,
                )
            )
        )
    return _Wrap(
        tr.T5Model(
            tr.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4, **small)
        ),
        True,
    )


def _compiled(name, dropout):
    torch.manual_seed(0)
    model = _hf(name, dropout)
    ids = torch.randint(0, 64, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = fraccompile.compile(copy.deepcopy(model), ids, FracConfig(**FP))
    return model, fm, ids


@pytest.mark.parametrize("name,attn_sites", [("gpt2", 4), ("bert", 4), ("t5", 0)])
def test_hf_models_sites_and_shapes(name, attn_sites):
    """Every GEMM-like op is a site (or kept by the config), and other batch sizes and sequence
    lengths run (dynamic export), bit-identical at precision 0."""
    model, fm, ids = _compiled(name, 0.0)
    sdpa = [s for s in fm.sites if s.op.startswith("sdpa")]
    assert len(sdpa) >= attn_sites
    assert not [o for o in fm.fp32_ops if "full precision" not in o.reason]
    for shape in [(2, 16), (3, 16), (2, 24), (1, 8)]:
        other = torch.randint(0, 64, shape)
        assert torch.equal(fm(other), model(other))


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_hf_models_eval_equals_original_eval(name):
    """Their eval-mode export graphs differ structurally from the train-mode ones (attention): the
    compiled model runs the graph captured in eval mode, sharing sites and parameters."""
    model, fm, ids = _compiled(name, 0.1)
    assert "frac_mode_merge" not in fm.meta
    model.eval()
    fm.eval()
    assert torch.equal(fm(ids), model(ids))
    other = torch.randint(0, 64, (3, 12))
    assert torch.equal(fm(other), model(other))
    fm.train()
    assert not torch.equal(fm(ids), model(ids))  # dropout (p=0.1) in train mode


def test_timm_and_torchvision_skip_cleanly():
    pytest.importorskip("torchvision")
    pytest.importorskip("timm")
