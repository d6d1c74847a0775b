"""A fuzz harness for gcomp: mutate valid models, run gcomp on each in a worker process.

- :mod:`tests.fuzz.seeds`: the valid models mutations start from (``models/`` builders,
  hand-made If/Loop/Scan/function models, a handful of ONNX node test models).
- :mod:`tests.fuzz.mutations`: the mutation kinds, their hypothesis strategies, and
  :func:`~tests.fuzz.mutations.draw_cases` / :func:`~tests.fuzz.mutations.materialize`,
  which turn a seed and a drawn mutation into the bytes of one case, deterministically.
- :mod:`tests.fuzz.runner`: the worker process (``gcomp optimize -O0/-O1`` and
  ``gcomp inspect --json`` through the CLI's code, errors classified), the parent that
  enforces the timeout of each command and restarts the worker after a crash or a
  hang, the summary, and the check of the real ``gcomp`` command's one-line errors.
- :mod:`tests.fuzz.campaign`: a long run from the command line, failing cases saved;
  ``--gcomp-args`` appends gcomp's own options (``--quantize ...``) to every ``gcomp optimize``.

``tests/test_fuzz.py`` runs a bounded, seeded campaign in the test suite.

This package is imported by the worker processes too: keep its top level light.
"""
