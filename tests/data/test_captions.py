"""Caption builders: class templates, and the CelebA attribute table and image folder."""

import numpy as np
import pytest
from PIL import Image

from diffax_lab.data import DataError
from diffax_lab.data.captions import (
    FASHION_MNIST_CLASSES,
    TEMPLATES,
    celeba_prompt,
    class_captions,
    load_celeba,
    read_celeba_attributes,
)


def test_class_captions_fill_a_template_with_the_class():
    caps = class_captions([0, 7, 9, 7], seed=3)
    assert len(caps) == 4
    for c, y in zip(caps, [0, 7, 9, 7], strict=True):
        assert any(c == t.format(FASHION_MNIST_CLASSES[y]) for t in TEMPLATES)
    assert class_captions([7] * 50, seed=0) != class_captions([7] * 50, seed=1)


def write_celeba(tmp_path, sizes):
    names = ["Bushy_Eyebrows", "No_Beard", "Wearing_Hat", "Smiling"]
    rows = [("000001.jpg", [1, -1, 1, -1]), ("000002.jpg", [-1, 1, -1, 1])]
    text = f"{len(rows)}\n{' '.join(names)}\n" + "".join(
        f"{f} {' '.join(f'{v:2d}' for v in vals)}\n" for f, vals in rows
    )
    (tmp_path / "list_attr_celeba.txt").write_text(text)
    for (f, _), (w, h) in zip(rows, sizes, strict=True):
        img = np.zeros((h, w, 3), np.uint8)
        img[:, (w - h) // 2 : (w - h) // 2 + h] = 200 if w >= h else 0  # the centred square
        Image.fromarray(img).save(tmp_path / f)
    return str(tmp_path / "list_attr_celeba.txt")


def test_celeba_attributes_become_the_course_prompts(tmp_path):
    attr = write_celeba(tmp_path, [(178, 218), (218, 178)])
    files, names, values = read_celeba_attributes(attr)
    assert files == ["000001.jpg", "000002.jpg"] and values.shape == (2, 4)
    assert celeba_prompt(values[0], names) == "Photo of person bushy eyebrows, beard, wearing hat"
    assert celeba_prompt(values[1], names) == "Photo of person smiling"
    images, prompts = load_celeba(str(tmp_path), attr)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert prompts[1] == "Photo of person smiling"
    # The second (landscape) image: its centred square is the bright band, all of the crop.
    assert images[1].min() > 150


def test_celeba_errors_name_the_file(tmp_path):
    attr = write_celeba(tmp_path, [(64, 64), (64, 64)])
    (tmp_path / "000002.jpg").unlink()
    with pytest.raises(DataError, match=r"not in .*first: 000002.jpg"):
        load_celeba(str(tmp_path), attr)
    (tmp_path / "bad.txt").write_text("3\nA B\nx.jpg 1 -1\n")
    with pytest.raises(DataError, match=r"bad.txt: the header says 3 rows of 2 attributes"):
        read_celeba_attributes(str(tmp_path / "bad.txt"))
