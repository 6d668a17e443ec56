"""A judge of an attribute the portrait world does not have, for runner tests (``python:judges_for_tests:brightness``).

It reads "eyewear" off the mean brightness of an image — a stand-in: what matters to the runner is that a
judge brings its own attribute names and classes. The threshold splits the tiny SD pipeline's samples.
"""
import torch
import torch.nn.functional as F

from helpers.judge import Batched


class Brightness(Batched, torch.nn.Module):
    attributes = {"eyewear": ("no glasses", "glasses")}

    def forward(self, images):
        m = images.float().mean((1, 2, 3))
        logit = (m - 0.447) * 400
        return {"eyewear": torch.stack([-logit, logit], 1)}

    def encode(self, images):
        return F.adaptive_avg_pool2d(images.float(), 4).flatten(1)


def brightness():
    return Brightness()


class AlwaysGlasses(Brightness):
    """A broken judge: reads every image as wearing glasses."""

    def forward(self, images):
        n = len(images)
        return {"eyewear": torch.tensor([[-5.0, 5.0]]).expand(n, 2)}


def always_glasses():
    return AlwaysGlasses()
