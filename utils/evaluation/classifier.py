"""A small CNN classifier for low-resolution class-labelled images (MNIST digits in the demo), used to score
whether generated images show the class they were asked for (the class-consistency score).

Images are (B, 3, H, W) in [-1, 1], any H, W >= 8 (three 2x poolings, then a global average).
"""
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool stages (width ch, 2ch, 4ch), global average pool, linear head."""

    def __init__(self, num_classes: int, ch: int = 16):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (ch, 2 * ch, 4 * ch):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True),
                       nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def embed(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, 4ch) that the head classifies (the feature space of the study's Frechet distance)."""
        return self.features(img_B3HW).mean(dim=(2, 3))

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(img_B3HW))  # (B, num_classes)


@torch.no_grad()
def predict(model: nn.Module, img_B3HW: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class per image (B,), in eval mode."""
    model.eval()
    return torch.cat([model(chunk).argmax(dim=1) for chunk in img_B3HW.split(batch_size)])


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """Fraction of `dataset` items ((image, label) pairs) classified correctly."""
    correct = total = 0
    for img_B3HW, label_B in DataLoader(dataset, batch_size=batch_size):
        correct += int((predict(model, img_B3HW) == label_B).sum())
        total += len(label_B)
    return correct / max(total, 1)


def train_classifier(train_set: Dataset, num_classes: int, epochs: int = 4, batch_size: int = 64, lr: float = 1e-2,
                     seed: int = 0, ch: int = 16) -> SmallCNN:
    """Train a SmallCNN with AdamW and a one-cycle cosine lr on (image, label) items; returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(num_classes, ch)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    model.train()
    t0 = time.time()
    for ep in range(epochs):
        total = 0.0
        for img_B3HW, label_B in loader:
            loss = F.cross_entropy(model(img_B3HW), label_B)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        logger.info("classifier epoch %d/%d: train loss %.4f (%.0fs)", ep + 1, epochs, total / len(loader),
                    time.time() - t0)
    return model.eval()
