"""A Gemm over flattened leading dims -> MatMul on the unflattened tensor, then the bias Add.

Exporters write a linear layer on an N-D tensor (GPT-2's ``Conv1D``, torch ``addmm`` on a
view) as flatten, Gemm, unflatten, with the sizes read back at run time:

    y = Reshape(Gemm(Reshape(x, [-1, K]), W, c; transB=t), Concat(d0, ..., d_{j-1}, [N]))

Math. For x of rank r >= 3 whose trailing dims ``x.shape[j:]`` multiply to K (j = r-1:
the last dim alone; j < r-1 when the flatten also merges dims, as GPT-2's head merge
does), flattening to ``[-1, K]`` puts row ``(i0, ..., i_{j-1})`` of x at row
``i0*s0 + ...`` of the matrix; the Gemm maps each row independently (``row @ W' + c``
with ``W' = W^T`` when transB=1, else W, and c a per-column bias); the unflatten to
``[d0, ..., d_{j-1}, N]`` puts every row back where it came from exactly when
``d_k = x.shape[k]`` for each k < j. So, with ``x' = Reshape(x, [0]*j + [K])`` (0 copies
x's dim; x' = x when j = r-1),

    y == MatMul(x', W') + c

with the same products and sums per element (MatMul broadcasts a 2-D W' over the leading
dims). Only the bias is added after the dot product instead of before: one rounding of the
same terms in another order.

Proved, not assumed: every ``d_k`` is x's dim k (a constant equal to a static dim, or read
from ``Shape`` of x or of a tensor with the same dim, see ``_dims.holds_dim``), or y's
inferred shape says so; the flatten shape is the constant ``[-1, K]`` with K the product of
x's static trailing dims; alpha = beta = 1;
transA = 0; c is a constant of shape [N], [1, N] or a scalar (a c that differs by row
cannot be unflattened); W is a constant when transB = 1 (the transpose is folded once);
the Gemm and the flattened tensor have no other use.

Why: the graph loses the run-time size arithmetic (Shape, Gather, Unsqueeze, Concat and two
Reshapes per layer: 9 nodes become 2), and the bias Add becomes visible to the fusions
after it (BiasGelu/FastGelu take the bias; a residual Add takes it as a third Sum input).
"""

from __future__ import annotations

__all__ = ["UNFLATTEN_GEMM"]

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from gcomp.passes.fusion._dims import float_attr, holds_dim, int_attr, same_dim
from gcomp.passes.fusion._engine import FusionRun, RunRule, fusion

_FLOATS = (np.float16, np.float32, np.float64)


def _kept(run: FusionRun, y, target, x) -> int | None:
    """How many leading dims of x the unflatten puts back (j, with ``target = x.shape[:j] + [N]``),
    proven by construction (a constant, or a Concat of sizes read from x's dims) or by y's
    inferred shape; None when it is not proven."""
    r = x.shape.rank()
    c = run.const(target)
    if c is not None:
        dims = c.reshape(-1).tolist()
        j = len(dims) - 1
        if 1 <= j < r and all(isinstance(x.shape[k], int) and dims[k] == x.shape[k] for k in range(j)):
            return j
        return None
    node = target.producer()
    if node is not None and node.op_type == "Concat" and 2 <= len(node.inputs) <= r:
        j = len(node.inputs) - 1
        if all(holds_dim(run, node.inputs[k], x, k) for k in range(j)):
            return j
    if y.shape is not None and y.shape.rank() is not None and 2 <= y.shape.rank() <= r:
        j = y.shape.rank() - 1
        if all(same_dim(y.shape[k], x.shape[k]) for k in range(j)):
            return j
    return None


class UnflattenGemm(RunRule):
    def pattern(self, op, x, flat_shape, w, c, target):
        flat = op.Reshape(x, flat_shape, _allow_other_attributes=True, _outputs=["flat"])
        g = op.Gemm(flat, w, c, _allow_other_attributes=True, _outputs=["g"])
        return op.Reshape(g, target, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, flat_shape, w, c, target, flat, g, y, **_):
        result = pattern.MatchResult()
        if x.shape is None or x.shape.rank() is None or x.shape.rank() < 3:
            return result.fail("the flattened tensor is not known to be of rank 3 or more", x)
        if x.dtype is None or x.dtype.numpy().type not in _FLOATS:
            return result.fail("not a float tensor", x)
        fs = self.run.const(flat_shape)
        if fs is None or fs.size != 2 or int(fs.reshape(-1)[0]) != -1:
            return result.fail("the flatten is not Reshape(x, [-1, K])", flat_shape)
        k = int(fs.reshape(-1)[1])
        j = _kept(self.run, y, target, x)
        if j is None:
            return result.fail("the unflatten shape is not proven to be x's leading dims", target)
        trailing = [x.shape[i] for i in range(j, x.shape.rank())]
        if not all(isinstance(d, int) for d in trailing) or int(np.prod(trailing)) != k:
            return result.fail("K is not the product of x's static trailing dims", flat_shape)
        for node in (flat.producer(), y.producer()):
            if int_attr(node, "allowzero", 0) != 0:
                return result.fail("a Reshape with allowzero=1", node)
        gemm = g.producer()
        if int_attr(gemm, "transA", 0) != 0:
            return result.fail("transA=1", gemm)
        if float_attr(gemm, "alpha", 1.0) != 1.0 or float_attr(gemm, "beta", 1.0) != 1.0:
            return result.fail("alpha or beta is not 1", gemm)
        trans_b = int_attr(gemm, "transB", 0)
        if w.shape is None or w.shape.rank() != 2 or w.dtype != x.dtype:
            return result.fail("the weight is not a 2-D tensor of x's dtype", w)
        if w.shape[1 if trans_b else 0] != k:
            return result.fail("the weight's inner size differs from K", w)
        if trans_b and self.run.const(w) is None:
            return result.fail("transB=1 on a weight that is not a constant", w)
        n = w.shape[0 if trans_b else 1]
        bias = self.run.const(c)
        if bias is None or bias.dtype != x.dtype.numpy():
            return result.fail("the bias is not a constant of x's dtype", c)
        if bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1) or (bias.size != 1 and bias.shape[-1] != n):
            return result.fail("the bias differs by row: it cannot be unflattened", c)
        if len(flat.uses()) != 1 or len(g.uses()) != 1 or flat.is_graph_output() or g.is_graph_output():
            return result.fail("the flattened tensor or the Gemm output is used elsewhere", g)
        return result

    def rewrite(self, op, x, w, c, g, y, target, flat_shape, **_):
        gemm = g.producer()
        if int_attr(gemm, "transB", 0):
            w = self.run.fresh_initializer(op, self.run.const(w).T, f"{w.name or 'weight'}_t")
        j = _kept(self.run, y, target, x)
        if j < x.shape.rank() - 1:  # merge the trailing dims; 0 copies a dim of x (allowzero=0)
            k = int(self.run.const(flat_shape).reshape(-1)[1])
            x = op.Reshape(x, op.Constant(value=ir.tensor(np.array([0] * j + [k], np.int64))))
        return op.Add(op.MatMul(x, w), c)


UNFLATTEN_GEMM = fusion(
    "unflatten-gemm", lambda run: [UnflattenGemm.rule("unflatten-gemm", run)], [("", "MatMul", 1), ("", "Add", 1)],
    "Reshape(Gemm(Reshape(x, [-1, K]), W, c), x's leading dims + [N]) -> MatMul(x, W) + c", needs=("Gemm",))
