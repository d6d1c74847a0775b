"""The Conv/Gemm fusions on torch-exported CNNs through ``gcomp.optimize`` O2 and O3 (verified on ORT)."""

from __future__ import annotations

import collections
import importlib.util
import warnings

import pytest

import gcomp

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                reason="needs torch (the export extra)")


def _ops(model) -> collections.Counter:
    return collections.Counter((f"{n.domain}::" if n.domain else "") + n.op_type for n in model.graph)


def _small_cnn(path):
    """Conv-BN-ReLU, grouped Conv-BN + residual + ReLU6, ConvTranspose-BN, Linear-BN1d; BN kept by the export."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
            self.c2, self.b2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2), torch.nn.BatchNorm2d(8)
            self.up, self.b3 = torch.nn.ConvTranspose2d(8, 4, 2, stride=2), torch.nn.BatchNorm2d(4)
            self.fc, self.b4 = torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5)

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = torch.nn.functional.relu6(self.b2(self.c2(y)) + y)
            return self.b4(self.fc(self.b3(self.up(y)).mean(dim=(2, 3))))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # non-trivial statistics, so a wrong fold shows
        for bn in (net.b1, net.b2, net.b3, net.b4):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # PRESERVE keeps BatchNormalization nodes (EVAL would fold them in the exporter).
        torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(path), input_names=["x"], opset_version=17,
                          dynamo=False, training=torch.onnx.TrainingMode.PRESERVE)
    return path


def test_torch_cnn_batchnorm_folded_at_o2_and_fused_conv_at_o3(tmp_path):
    path = _small_cnn(tmp_path / "cnn.onnx")
    o2 = gcomp.optimize(path, pipeline="O2", target="ort-cpu")
    assert o2.verification.passed, o2.verification.summary()
    ops = _ops(o2.model)
    assert "BatchNormalization" not in ops
    assert ops["Conv"] == 2 and ops["ConvTranspose"] == 1 and ops["Gemm"] == 1

    o3 = gcomp.optimize(path, pipeline="O3", target="ort-cpu")
    assert o3.verification.passed, o3.verification.summary()
    ops = _ops(o3.model)
    assert "BatchNormalization" not in ops and "Relu" not in ops
    # Conv-BN-ReLU -> FusedConv(Relu); the residual Add stands between the second Conv and its ReLU6.
    assert ops["com.microsoft::FusedConv"] == 1 and ops["Clip"] == 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers (the export extra)")
def test_export_torch_mobilenetv2_o3_fused_conv_without_pads(tmp_path):
    from models import export_torch

    path = export_torch.export("mobilenetv2", tmp_path, check=False, config={"image_size": 64})
    result = gcomp.optimize(path, pipeline="O3", target="ort-cpu")
    assert result.verification.passed, result.verification.summary()
    ops = _ops(result.model)
    # transformers' MobileNetV2: 35 Conv + ReLU6 (Clip 0..6) pairs, 18 TF-style "same" Pads.
    assert ops["com.microsoft::FusedConv"] == 35 and "Clip" not in ops and "Pad" not in ops
