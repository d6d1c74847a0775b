"""How MetaSchedule's candidates are built and timed: in this process.

MetaSchedule's default builder and runner use a pool of worker processes; on a loaded
2-core machine those workers time out while importing TVM. :func:`in_process_builder_runner`
builds each candidate with TVM's own default build and times it with TVM's own runner
function, in the calling process. :func:`fast_inspect` makes MetaSchedule's first use
take seconds instead of minutes.
"""

from __future__ import annotations

__all__ = ["fast_inspect", "in_process_builder_runner"]

import tempfile
import warnings
from pathlib import Path


def fast_inspect() -> None:
    """Make MetaSchedule's first use take seconds, not minutes.

    Importing ``tvm.s_tir.tensor_intrin`` parses ~500 TVMScript functions, each calling
    ``inspect.stack()``; for the frozen importlib frames on the stack ``inspect.getmodule``
    finds no cached file and scans all of ``sys.modules`` (thousands with torch loaded):
    100 s on this machine. Telling inspect which modules those frozen files are makes
    every lookup a cache hit (6 s). Harmless: it is the answer inspect would find.
    """
    import inspect

    for frozen in ("importlib._bootstrap", "importlib._bootstrap_external"):
        inspect.modulesbyfile.setdefault(f"<frozen {frozen}>", frozen)


def in_process_builder_runner(work: Path, evaluator: dict):
    """(builder, runner) for MetaSchedule that work in this process; candidates' libraries
    go under ``work/artifacts``; ``evaluator`` is MetaSchedule's ``EvaluatorConfig``."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder, local_builder
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner, local_runner

    artifacts = work / "artifacts"
    artifacts.mkdir(exist_ok=True)
    counter = iter(range(1 << 30))

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            from tvm.support.tar import tar

            results = []
            for item in build_inputs:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)  # tvm.build, inside TVM
                        rt_mod = local_builder.default_build(item.mod, item.target, None)
                    # MetaSchedule's measure callback deletes the artifact's folder.
                    folder = Path(tempfile.mkdtemp(prefix=f"c{next(counter)}-", dir=artifacts))
                    path = folder / f"cand.{tar.output_format}"
                    rt_mod.export_library(str(path), fcompile=tar)
                    results.append(BuilderResult(str(path), None))
                except Exception as e:  # a candidate that does not build is a result, not an error
                    results.append(BuilderResult(None, f"in-process build: {e}"))
            return results

    config = EvaluatorConfig(**evaluator)

    @derived_object
    class InProcessRunner(PyRunner):
        def run(self, runner_inputs):
            futures = []
            for item in runner_inputs:
                try:
                    costs = local_runner._worker_func(
                        None, None, None, config, 1, str(item.artifact_path), str(item.device_type),
                        tuple(a.as_json() for a in item.args_info),
                    )
                    futures.append(local_runner.LocalRunnerFuture(res=costs, error_message=None))
                except Exception as e:
                    futures.append(local_runner.LocalRunnerFuture(res=None, error_message=str(e)))
            return futures

    return InProcessBuilder(), InProcessRunner()
