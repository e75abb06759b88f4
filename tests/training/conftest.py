"""Fixtures of the training tests: three small random training images."""
import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rs = np.random.RandomState(0)
    for i in range(3):
        Image.fromarray((rs.rand(40, 48, 3) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return d
