"""CelebA attributes-to-faces: exact prompts from attribute rows (both sources) and the
synthetic folder in the original layout through configs/celeba.py:tiny."""

import os

import numpy as np
import pytest
from PIL import Image

from diffax_lab import config_lib
from diffax_lab.data import celeba
from diffax_lab.data.captions import read_celeba_attributes
from diffax_lab.modes import sample, train
from diffax_lab.tasks import registry


def row(*present):
    """A 1 / -1 row with the named attributes present (and a beard unless No_Beard)."""
    return [1 if a in present else -1 for a in celeba.ATTRIBUTES]


def test_prompts_from_attribute_rows_are_exact():
    # The table's order: "beard" (No_Beard = -1) comes where No_Beard is, after the mouth.
    assert (
        celeba.prompt(row("Bushy_Eyebrows", "Mouth_Slightly_Open", "Wearing_Hat"))
        == "Photo of person bushy eyebrows, mouth slightly open, beard, wearing hat."
    )
    assert celeba.prompt(row("No_Beard")) == "Photo of person."
    assert (
        celeba.prompt(row("5_o_Clock_Shadow", "Blond_Hair", "No_Beard", "Smiling", "Young"))
        == "Photo of person 5 o clock shadow, blond hair, smiling, young."
    )
    # tfds celeb_a: a dict of boolean arrays gives the same strings.
    rows = [row("Eyeglasses", "No_Beard"), row("Bald", "Male")]
    attrs = {a: np.array([r[i] > 0 for r in rows]) for i, a in enumerate(celeba.ATTRIBUTES)}
    assert celeba.prompts_from_tfds(attrs) == [
        "Photo of person eyeglasses.",
        "Photo of person bald, male, beard.",
    ]
    with pytest.raises(ValueError, match="40 attributes"):
        celeba.prompt([1, -1])


def test_synthetic_folder_has_the_original_layout(tmp_path):
    folder, values = celeba.write_synthetic(str(tmp_path), n=5, size=20)
    files, names, table = read_celeba_attributes(os.path.join(tmp_path, celeba.ATTRIBUTE_FILE))
    assert names == list(celeba.ATTRIBUTES) and files[0] == "000001.jpg"
    np.testing.assert_array_equal(table, values)
    with Image.open(os.path.join(folder, files[-1])) as img:
        assert img.size == (20, 20) and img.mode == "RGB"
    prompts = celeba.prompts_from_folder(str(tmp_path))
    assert prompts["000002.jpg"] == celeba.prompt(values[1])
    crop = celeba.square_crop(np.zeros((2, 218, 178, 3)))
    assert crop.shape == (2, 178, 178, 3)


@pytest.mark.slow
def test_synthetic_celeba_trains_and_samples(tmp_path):
    """The 2x upsampler of the recipe on the synthetic folder (configs/celeba.py:tiny,up):
    the folder source reads the original layout, trains, and draws (the text2img base on
    the same folder is the text2img task's own test, with a CLIP)."""
    folder, _ = celeba.write_synthetic(str(tmp_path / "celeba"), n=12, size=24)
    config = config_lib.load_config("celeba.py:tiny,up")
    config.data.dir = folder
    assert config.diffusion.schedule == "cosine" and config.diffusion.num_timesteps == 100
    workdir = str(tmp_path / "run")
    train.run(config, workdir)
    out = sample.run(config, workdir)
    assert out["samples"].shape == (2, 16, 16, 3)
    assert os.path.exists(out["rows"])
    base = config_lib.load_config("celeba.py:tiny")  # the base's config checks out too
    base.data.dir = folder
    assert registry.check_config(base).name == "text2img"
