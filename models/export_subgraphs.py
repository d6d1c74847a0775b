"""PyTorch models whose ONNX exports put their work in subgraphs, or in RNNs (needs torch).

Registered in :data:`models.export_torch.EXPORTERS` (``python models/export_torch.py vad
-o DIR``) and exported the same way: the TorchScript exporter, opset 17, random weights
(seeded), checked against PyTorch on ONNX Runtime. The scripted ones are
``torch.jit.script`` modules, so their Python control flow becomes ONNX ``If``/``Loop``
nodes; the TorchScript exporter folds constants in the main graph only, so each branch
and loop body keeps the ``Constant`` nodes and shape arithmetic (``Shape``/``Gather``/
``Slice``/``Unsqueeze``/``Concat``) an optimizer must clean up inside subgraphs.

- ``vad``: a voice-activity detector shaped like the common streaming VAD exports: an
  ``If`` on the sample rate (16 kHz or 8 kHz) holds the whole network in each branch:
  reflection padding, an STFT as a strided ``Conv1d``, magnitude, four conv blocks, an
  LSTM cell over the recurrent state, a 1x1 conv decoder and a sigmoid.
- ``gru_seqlen``: a GRU classifier with a branch on sequence length: over
  ``LONG_INPUT`` frames the input is downsampled by a strided conv and read by one GRU,
  shorter inputs go to another GRU directly.
- ``rnn_loop``: a GRU cell stepped by a scripted ``for`` loop over time (an ONNX
  ``Loop`` whose body holds the cell's arithmetic), then a linear head.
- ``audio_gru``: a small keyword-spotting classifier (two conv blocks on log-mel-like
  features, a GRU, a linear head), traced: no subgraph, an RNN exported with its
  weight-splitting chains.
- ``crnn``: an OCR text recogniser (CRNN: conv/BatchNorm/ReLU/max-pool stack, the
  height collapsed, a bidirectional LSTM, per-column log-softmax), traced.

torch is imported inside functions: the module classes live in
:mod:`models._subgraph_nets`, imported on first use.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["LONG_INPUT", "exporters"]

LONG_INPUT = 50  # gru_seqlen: frames above this take the downsampling branch


def exporters(spec_type: type, require_torch: Any) -> dict[str, Any]:
    """``name -> spec builder`` for :data:`models.export_torch.EXPORTERS`.

    ``spec_type`` is ``ExportSpec`` and ``require_torch`` returns ``(torch, transformers)``
    (passed in so that this module does not import ``export_torch``, which imports it).
    """

    def spec(name: str) -> Any:
        def build(*, seed: int = 0, batch: int = 2, **_: Any) -> Any:
            torch, _t = require_torch()
            torch.manual_seed(seed)
            with warnings.catch_warnings():  # torch.jit.script is deprecated: its control flow is the point
                warnings.simplefilter("ignore", DeprecationWarning)
                module, args, names, outputs, axes = _BUILDERS[name](torch, batch, seed)
            return spec_type(module=module, args=args, input_names=names, output_names=outputs, dynamic_axes=axes)

        build.__name__ = name
        return build

    return {name: spec(name) for name in _BUILDERS}


def _nets() -> Any:
    """The torch module classes (:mod:`models._subgraph_nets`, which imports torch)."""
    if __package__:
        from . import _subgraph_nets
    else:  # run as a script from models/ (python models/export_torch.py ...)
        import _subgraph_nets
    return _subgraph_nets


def _randomize_batchnorm(torch: Any, module: Any, seed: int) -> None:
    """Running statistics away from 0/1, so folding a BatchNorm is not a no-op."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_((torch.rand(m.running_mean.shape, generator=gen) - 0.5) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_((torch.rand(m.bias.shape, generator=gen) - 0.5) * 0.2)


def _vad(torch: Any, batch: int, seed: int):
    module = _nets().Vad(64).eval()
    _randomize_batchnorm(torch, module, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 512, generator=gen)
    state = torch.randn(2, batch, 64, generator=gen) * 0.1
    sr = torch.tensor(16000, dtype=torch.int64)
    axes = {"x": {0: "batch", 1: "samples"}, "state": {1: "batch"}, "prob": {0: "batch"}, "state_out": {1: "batch"}}
    return torch.jit.script(module), (x, sr, state), ["x", "sr", "state"], ["prob", "state_out"], axes


def _gru_seqlen(torch: Any, batch: int, seed: int):
    module = _nets().GruSeqLen(40, 64, 12, LONG_INPUT).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2 * LONG_INPUT, 40, generator=gen)
    axes = {"x": {0: "batch", 1: "frames"}, "logits": {0: "batch"}}
    return torch.jit.script(module), (x,), ["x"], ["logits"], axes


def _rnn_loop(torch: Any, batch: int, seed: int):
    module = _nets().RnnLoop(40, 64, 12).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 20, 40, generator=gen)
    axes = {"x": {0: "batch", 1: "frames"}, "logits": {0: "batch"}}
    return torch.jit.script(module), (x,), ["x"], ["logits"], axes


def _audio_gru(torch: Any, batch: int, seed: int):
    module = _nets().AudioGru(40, 64, 12).eval()
    _randomize_batchnorm(torch, module, seed)
    gen = torch.Generator().manual_seed(seed)
    mel = torch.randn(batch, 40, 64, generator=gen)
    axes = {"mel": {0: "batch", 2: "frames"}, "logits": {0: "batch"}}
    return module, (mel,), ["mel"], ["logits"], axes


def _crnn(torch: Any, batch: int, seed: int):
    module = _nets().Crnn(64, 37).eval()
    _randomize_batchnorm(torch, module, seed)
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, 32, 128, generator=gen)
    axes = {"image": {0: "batch", 3: "width"}, "log_probs": {0: "batch", 1: "columns"}}
    return module, (image,), ["image"], ["log_probs"], axes


_BUILDERS = {
    "vad": _vad,
    "gru_seqlen": _gru_seqlen,
    "rnn_loop": _rnn_loop,
    "audio_gru": _audio_gru,
    "crnn": _crnn,
}
