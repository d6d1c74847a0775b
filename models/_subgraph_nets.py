"""The torch modules behind :mod:`models.export_subgraphs` (imports torch: import it only
where torch is installed; TorchScript reads the classes' source from this file)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AudioGru", "ConvBlock", "Crnn", "GruSeqLen", "RnnLoop", "Stft", "Vad", "VadBranch"]

class Stft(nn.Module):
    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.n_fft = n_fft
        self.hop = hop
        self.register_buffer("basis", torch.randn(n_fft + 2, 1, n_fft) * (1.0 / n_fft) ** 0.5)

    def forward(self, x: Tensor) -> Tensor:
        pad = self.n_fft // 4
        x = F.pad(x.unsqueeze(1), [pad, pad], mode="reflect")
        y = F.conv1d(x, self.basis, stride=self.hop)
        cutoff = self.n_fft // 2 + 1
        re = y[:, :cutoff, :]
        im = y[:, cutoff:, :]
        return torch.sqrt(re * re + im * im + 1e-6)


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, 3, stride=stride, padding=1)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class VadBranch(nn.Module):
    def __init__(self, n_fft: int, hop: int, hidden: int):
        super().__init__()
        self.stft = Stft(n_fft, hop)
        bins = n_fft // 2 + 1
        self.encoder = nn.Sequential(
            ConvBlock(bins, hidden, 1), ConvBlock(hidden, hidden, 2), ConvBlock(hidden, hidden, 2),
            ConvBlock(hidden, hidden, 1),
        )
        self.cell = nn.LSTMCell(hidden, hidden)
        self.decoder = nn.Conv1d(hidden, 1, 1)

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.encoder(self.stft(x)).mean(dim=-1)
        h, c = self.cell(feats, (state[0], state[1]))
        prob = torch.sigmoid(self.decoder(h.unsqueeze(-1))).squeeze(-1)
        return prob, torch.stack([h, c])


class Vad(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.at16k = VadBranch(64, 32, hidden)
        self.at8k = VadBranch(32, 16, hidden)

    def forward(self, x: Tensor, sr: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        if bool(sr == 16000):
            prob, new_state = self.at16k(x, state)
        else:
            prob, new_state = self.at8k(x, state)
        return prob, new_state


class GruSeqLen(nn.Module):
    def __init__(self, features: int, hidden: int, classes: int, long_input: int):
        super().__init__()
        self.long_input = long_input
        self.down = nn.Conv1d(features, features, 3, stride=2, padding=1)
        self.long_gru = nn.GRU(features, hidden, batch_first=True)
        self.short_gru = nn.GRU(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.size(1) > self.long_input:
            y = torch.relu(self.down(x.transpose(1, 2))).transpose(1, 2)
            _, h = self.long_gru(y)
            last = h[-1]
        else:
            _, h = self.short_gru(x)
            last = h[-1]
        return torch.log_softmax(self.head(last), dim=-1)


class RnnLoop(nn.Module):
    """A GRU cell written out (nn.GRUCell's scripted shape checks do not export), stepped
    over time by a scripted loop."""

    def __init__(self, features: int, hidden: int, classes: int):
        super().__init__()
        self.hidden = hidden
        self.ih = nn.Linear(features, 3 * hidden)
        self.hh = nn.Linear(hidden, 3 * hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.zeros(x.size(0), self.hidden, dtype=x.dtype)
        for t in range(x.size(1)):
            gi = self.ih(x[:, t, :])
            gh = self.hh(h)
            i_r, i_z, i_n = gi.chunk(3, 1)
            h_r, h_z, h_n = gh.chunk(3, 1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
        return self.head(h)


class AudioGru(nn.Module):
    def __init__(self, mels: int, hidden: int, classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=(2, 1), padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.gru = nn.GRU(32 * (mels // 2), hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, mel: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(mel.unsqueeze(1))))
        x = F.relu(self.bn2(self.conv2(x)))
        b, c, f, t = x.shape
        x = x.permute(0, 3, 1, 2).reshape(b, t, c * f)
        out, _ = self.gru(x)
        return self.head(out.mean(dim=1))


class Crnn(nn.Module):
    def __init__(self, hidden: int, classes: int):
        super().__init__()
        layers = []
        cin = 1
        for i, cout in enumerate((16, 32, 64, 64)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            layers.append(nn.MaxPool2d(2, 2) if i < 2 else nn.MaxPool2d((2, 1), (2, 1)))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.rnn = nn.LSTM(64 * 2, hidden, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, image: Tensor) -> Tensor:
        x = self.features(image)
        b, c, h, w = x.size()
        x = x.permute(0, 3, 1, 2).reshape(b, w, c * h)
        out, _ = self.rnn(x)
        return F.log_softmax(self.head(out), dim=-1)
