"""Pretrained weights in and out: diffusers ``UNet2DModel`` folders <-> lab workdirs.

From diffusers (a UNet2DModel folder, or a pipeline folder holding unet/ and scheduler/)
to a lab workdir that ``--mode=sample`` and ``--mode=eval`` accept (config.json with the
model section taken from the folder's config.json and the diffusion section from its
scheduler_config.json, and an orbax checkpoint at step 0 whose params and EMA params are
the folder's weights)::

    python -m diffax_lab.convert --from_diffusers=DIR --workdir=W \\
        [--config=configs/ddpm.py] [--config.data.source=tfds --config.data.name=cifar10 ...]

From a lab workdir (its newest checkpoint's EMA weights, or --checkpoint_step) to a
``DDPMPipeline`` folder that ``DDPMPipeline.from_pretrained`` / ``UNet2DModel.from_pretrained``
(``subfolder="unet"``) load::

    python -m diffax_lab.convert --to_diffusers=OUT --workdir=W [--checkpoint_step=N]

Mistakes are reported in one line naming the flag or field and the fix (exit status 2).
Not for: training from such weights (``--config.init.from_diffusers=DIR`` of
``diffax_lab.main``) or the mapping itself (``models/diffusers_unet.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from absl import logging

from diffax_lab import checkpointing, config_lib
from diffax_lab import workdir as workdir_lib
from diffax_lab.errors import ConfigError, DataError, WorkdirError
from diffax_lab.models.diffusers_unet import DiffusersFormatError, export_pipeline
from diffax_lab.models.unet import UNet
from diffax_lab.modes.common import prepare, restore

PROVENANCE = "converted_from.json"  # written beside config.json: where the weights came from


def split_overrides(argv):
    """({"a.b": "v"} from --config.a.b=v or --config.a.b v, the other arguments)."""
    overrides, rest = {}, []
    args = iter(argv)
    for a in args:
        if a.startswith("--config."):
            key, eq, value = a[len("--config.") :].partition("=")
            overrides[key] = value if eq else next(args, "")
        else:
            rest.append(a)
    return overrides, rest


def from_diffusers(src: str, workdir: str, config_spec: str = "", overrides=None) -> dict:
    """Writes a lab workdir (config.json + a step-0 checkpoint) from a diffusers folder."""
    if not os.path.isdir(src):
        raise ConfigError(
            f"--from_diffusers={src!r} is not a folder; give a UNet2DModel folder (config.json "
            "+ diffusion_pytorch_model.safetensors) or a pipeline folder holding unet/."
        )
    workdir = workdir_lib.check_workdir(workdir)
    if workdir_lib.has_checkpoints(workdir):
        raise WorkdirError(
            f"--workdir={workdir!r} already holds checkpoints; convert into a new directory."
        )
    config = config_lib.load_config(config_spec or config_lib.DEFAULT_CONFIG)
    config_lib.apply_string_overrides(config, overrides or {})
    config.init.from_diffusers = os.path.abspath(src)
    workdir, _, task = prepare(config, workdir, "train")  # takes the model from the folder
    workdir_lib.make_writable(workdir)
    task.load_resources(workdir, "train")  # reads and checks the weights
    state = task.create_state()  # params and EMA params = the folder's weights, step 0
    # The weights now live in the checkpoint: the run needs the folder no longer.
    config.init.from_diffusers = ""
    workdir_lib.write_config(workdir, config)
    with open(os.path.join(workdir, PROVENANCE), "w") as f:
        json.dump({"from_diffusers": os.path.abspath(src)}, f, indent=2)
    ckpt = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
    try:
        ckpt.save(0, state)
    finally:
        ckpt.close()
    logging.info("Wrote %s: config.json and the checkpoint at step 0.", workdir)
    return {"workdir": workdir, "num_params": task.count_params()}


def to_diffusers(workdir: str, out: str, step: int = 0, overrides=None) -> dict:
    """Writes the EMA weights of ``workdir``'s checkpoint as a DDPMPipeline folder."""
    workdir = workdir_lib.check_workdir(workdir)
    config = config_lib.load_run_config(workdir, "--workdir")
    config_lib.apply_string_overrides(config, overrides or {})
    config.init.from_diffusers = ""  # the checkpoint holds the weights
    workdir, _, task = prepare(config, workdir, "sample")
    if not isinstance(task.model, UNet) or config.model.name != "unet":
        raise ConfigError(
            f"--workdir={workdir!r} is a {task.name!r} run of a {type(task.model).__name__}; "
            "only a pixel-space U-Net (model.name='unet') exports to UNet2DModel."
        )
    state, step = restore(task, workdir, step)
    c = config
    try:
        export_pipeline(
            task.model,
            state["ema_params"],
            out,
            schedule=c.diffusion.schedule,
            num_timesteps=c.diffusion.num_timesteps,
            prediction=c.diffusion.prediction,
            clip_x0=c.sample.clip_x0 or None,
            variance=c.sample.variance,
            sample_size=c.data.image_size,
        )
    except DiffusersFormatError as e:
        raise ConfigError(f"--to_diffusers: {e}") from None
    logging.info("Wrote the EMA weights of step %d of %s to %s.", step, workdir, out)
    return {"out": os.path.abspath(out), "step": step}


def main(argv=None) -> int:
    """The command line; returns the exit status (0, or 2 for a user mistake)."""
    overrides, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(
        prog="python -m diffax_lab.convert",
        description="diffusers UNet2DModel folder <-> lab workdir (see the module docstring).",
    )
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from_diffusers", metavar="DIR", help="diffusers folder to read")
    direction.add_argument("--to_diffusers", metavar="OUT", help="diffusers folder to write")
    parser.add_argument("--workdir", required=True, help="the lab workdir (written / read)")
    parser.add_argument(
        "--config", default="", help="base config for --from_diffusers (default: configs/ddpm.py)"
    )
    parser.add_argument("--checkpoint_step", type=int, default=0, help="0 = the newest")
    args = parser.parse_args(rest)
    try:
        if args.from_diffusers:
            out = from_diffusers(args.from_diffusers, args.workdir, args.config, overrides)
        else:
            if args.config:
                raise ConfigError(
                    "--config is for --from_diffusers; --to_diffusers reads the workdir's "
                    "config.json (change its sample fields with --config.sample.X=V)."
                )
            out = to_diffusers(args.workdir, args.to_diffusers, args.checkpoint_step, overrides)
    except (ConfigError, DataError, WorkdirError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
