"""Text-to-image through CLIP: image embeddings cached for training, a prompt grid from
text embeddings with classifier-free guidance."""

import glob
import os

from PIL import Image

from diffax_lab import sampling, train
from tests.helpers import load_config, write_fake_idx


def test_text2img_trains_on_cached_image_embeddings_and_draws_prompts(tmp_path):
    data = write_fake_idx(tmp_path / "data", n_train=64, n_test=32)
    clip = load_config("clip.py", "tiny")
    clip.data.dir, clip.data.num_examples = str(data), 0
    train.train(clip, str(tmp_path / "clip"))

    config = load_config("text2img.py", "tiny")
    config.data.dir, config.data.num_examples = str(data), 0
    config.text.clip_dir = str(tmp_path / "clip" / "hf_clip")
    workdir = str(tmp_path / "t2i")
    train.train(config, workdir)
    cached = glob.glob(os.path.join(workdir, "clip_embeddings_train_*.npz"))
    assert len(cached) == 1
    mtime = os.path.getmtime(cached[0])
    config.train.num_steps = 6
    train.train(config, workdir)  # resumes; the embeddings are reused, not recomputed
    assert os.path.getmtime(cached[0]) == mtime

    out = sampling.sample(config, workdir)
    grid = out["grid"].replace(".png", "_prompts.png")
    with Image.open(grid) as img:  # two prompts: two rows of two 28x28 tiles, scaled 2x
        assert img.size[1] == 2 * (2 * 30 + 2)
