"""Fusion rules (onnxscript rewriter), one file per fusion; see DESIGN.md "Passes"."""
