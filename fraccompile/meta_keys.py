"""The keys of ``node.meta`` and ``GraphModule.meta`` that capture and the passes write and read, and
the named graph properties passes declare in ``requires`` / ``ensures``. Every module that reads or
writes one of these keys imports it from here.

This module imports nothing from fraccompile: capture, the passes, the model and the report all
depend on it, never the other way round.
"""

from __future__ import annotations

# -- node.meta: written by torch (fx shape propagation, torch.export) ---------------------------------
TENSOR_META = "tensor_meta"  # TensorMetadata of a node's output (capture's shape propagation)
VAL = "val"  # FakeTensor of a node's output (torch.export)
NN_MODULE_STACK = "nn_module_stack"  # {key: (module path, class)} of the modules a node ran in
TYPE = "type"  # Python type of a node's output (capture's shape propagation, as torch's ShapeProp)
IS_WRAPPED = "is_wrapped"  # fx: the node calls a torch.fx.wrap'd function

# -- node.meta: written by capture ----------------------------------------------------------------
META_GEMM_CALLS = "frac_gemm_calls"  # Counter of GEMM-like torch calls made inside an opaque node

# -- node.meta: written by the passes -------------------------------------------------------------
META_SITE = "frac_site"  # SiteInfo, on the node that calls a FracOp
META_FP_LAYER = "frac_fp_layer"  # SiteInfo (full_precision=True), on a layer the config keeps in fp32
META_CALL_SHAPES = "frac_call_shapes"  # (input, weight, output) shapes of one site call
META_PRECISION_NODE = "frac_precision_node"  # site name, on a precision-control node
META_SITE_PARTS = "frac_site_parts"  # [(SiteInfo, call shapes)], on a composite site's node
META_NOT_SITE = "frac_not_site"  # why a GEMM-like op stays in fp32 (the coverage table)
META_REGION = "frac_region"  # name of the DFQ region a node lies in
META_GATE = "frac_gate"  # region name, on a DFQ gate node

# -- GraphModule.meta: written by capture ---------------------------------------------------------
GM_CAPTURE = "frac_capture"  # "fx" or "export": how the graph was captured
GM_STATIC_DIMS = "frac_static_dims"  # export path: input dimensions the graph is specialized to
GM_MODE_MERGE = "frac_mode_merge"  # module paths whose eval-mode graph could not be merged
GM_EVAL_GRAPH = "frac_eval_graph"  # export path: the graph captured in eval mode, when it differs
GM_EVAL_MODULES = "frac_eval_modules"  # module paths where that eval graph differs structurally
GM_OPAQUE_FNS = "frac_opaque_fns"  # fx path: wrapped function -> why it was not traced through

# -- GraphModule.meta: written by the passes ------------------------------------------------------
GM_FP32_OPS = "frac_fp32_ops"  # [Fp32Op]: every GEMM-like op left in fp32, and why
GM_REGIONS = "frac_regions"  # [Region] in graph order (region-discovery)
GM_PROPERTIES = "frac_properties"  # frozenset of the graph properties below that hold

# -- graph properties: what a pass requires before it runs and ensures after it ------------------
SHAPES = "shapes"
SITES = "sites"
MACS = "macs"
REGIONS = "regions"
GATES = "gates"
EPILOGUES = "epilogues"
CHANNELS_LAST_INPUTS = "channels-last-inputs"

PROPERTIES = {
    SHAPES: f"nodes carry their output shapes (meta[{TENSOR_META!r}] or meta[{VAL!r}]; capture)",
    SITES: f"GEMMs are sites or kept layers (meta[{META_SITE!r}], [{META_FP_LAYER!r}], "
    f"[{META_SITE_PARTS!r}], [{META_CALL_SHAPES!r}]) with precision-control nodes",
    MACS: "every SiteInfo holds its multiply-accumulates per step",
    REGIONS: f"gm.meta[{GM_REGIONS!r}] lists the DFQ regions, nodes tagged meta[{META_REGION!r}]",
    GATES: f"a DFQ gate per region feeds its sites' precision nodes (meta[{META_GATE!r}])",
    EPILOGUES: "activations (and BatchNorms) after single-use sites are in the sites' epilogues, "
    "where the backend's capabilities allow",
    CHANNELS_LAST_INPUTS: "2-D convs kept in fp32 read channels-last inputs, where the backend's "
    "capabilities ask for it",
}
CAPTURED = frozenset({SHAPES})  # what a graph from fraccompile.capture provides
