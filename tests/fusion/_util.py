"""Helpers for fusion tests: run one fusion pass and prove it numerically on ORT."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from gcomp.passes.fusion import Fuse, FuseTarget, fuse_model
from gcomp.runtime import pass_context
from tests.conftest import assert_same_outputs


def op_counts(model: ir.Model) -> collections.Counter:
    from gcomp.passes.scopes import all_scopes

    return collections.Counter(
        (f"{n.domain}::" if n.domain else "") + n.op_type for scope in all_scopes(model) for n in scope
    )


def fuse(proto, feeds, *, target="portable", family="portable", rtol=1e-5, atol=1e-5, explain=False,
         without=()):
    """Fuse ``proto`` (shapes inferred first, like the pipeline does) and prove it on ORT.

    ``without``: names of fusions of the pass's list not to run. Returns (fused ir.Model,
    pass result details).
    """
    from gcomp.passes.shapes import ForgetInferredShapes, InferShapes

    model = ir.serde.deserialize_model(proto)
    InferShapes()(model)
    kind = Fuse if family == "portable" else FuseTarget
    pass_ = kind(target=target, explain_fusion=explain, context=pass_context())
    if without:
        fusions = [f for f in pass_.fusions(pass_.capabilities) if f.name not in without]
        result = fuse_model(model, fusions, pass_.capabilities, explain=explain)
    else:
        result = pass_(model)
    ForgetInferredShapes()(model)
    assert_same_outputs(proto, model, feeds, rtol=rtol, atol=atol)
    return model, result


def feeds_for(rng, **shapes):
    return {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
