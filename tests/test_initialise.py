"""splatdd.initialise: real images for init_from_real, class by class, from one generator."""
import pytest
import torch

from splatdd.initialise import real_images_for
from splatdd.testing import make_tiny_real


def _which(images: torch.Tensor, real) -> list[int]:
    """Index in ``real`` of each image (exact match)."""
    flat = real.images.flatten(1)
    return [int(torch.nonzero((flat == im.flatten()).all(1))[0]) for im in images]


def test_classes_match_and_images_are_distinct_while_enough():
    real = make_tiny_real(n_per_class=5)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    imgs = real_images_for(labels, real, torch.Generator().manual_seed(0))
    idx = _which(imgs, real)
    assert [int(real.labels[i]) for i in idx] == labels.tolist()
    assert len(set(idx)) == len(idx)
    again = real_images_for(labels, real, torch.Generator().manual_seed(0))
    assert torch.equal(imgs, again)


def test_more_stored_images_than_real_ones_reuses_every_image():
    real = make_tiny_real(n_per_class=3)
    labels = torch.tensor([1] * 7)
    idx = _which(real_images_for(labels, real, torch.Generator().manual_seed(0)), real)
    assert all(int(real.labels[i]) == 1 for i in idx)
    assert len(set(idx)) == 3 and len(set(idx[:3])) == 3 and len(set(idx[3:6])) == 3


def test_empty_class_is_a_clear_error():
    real = make_tiny_real(n_per_class=2)
    keep = real.labels != 2
    real.images, real.labels, real._by_class = real.images[keep], real.labels[keep], None
    with pytest.raises(ValueError, match="class 2 has no real images"):
        real_images_for(torch.tensor([2]), real, None)
