"""`idguard COMMAND ...`: one console script over the command lines in experiments/ and convert/.

    idguard protect photo.jpg --out protected/ --generator weights/generator
    idguard verify photo.jpg protected/photo.jpg --weights weights/ --out check.png
    idguard train --config=demo
"""
from __future__ import annotations

import importlib
import sys

from idguard_jax import compile_cache, startup

# command -> (module with main(argv), one line of help)
COMMANDS = {
    "protect": ("experiments.protect", "protect the faces in your photos"),
    "verify": ("experiments.verify", "show what manipulation models make of original vs protected"),
    "evaluate": ("experiments.evaluate", "the paper's tables for a generator or a baseline"),
    "train": ("experiments.train", "train the perturbation generator"),
    "convert": ("convert.convert", "convert an official PyTorch checkpoint"),
    "prepare": ("experiments.prepare", "build a training data cache"),
    "heatmaps": ("experiments.heatmaps", "Grad-CAM++ heatmaps for the mask loss"),
    "prior": ("experiments.prior", "the gradient prior perturbation"),
    "bench": ("experiments.bench", "time the train step and protection"),
    "check-dtype": ("experiments.check_dtype", "protect --dtype bfloat16 against float32, in "
                                               "grey levels"),
}


@startup.command
def main(argv=None) -> int:
    as_command = argv is None
    argv = sys.argv[1:] if as_command else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: idguard COMMAND [ARGS...]   (idguard COMMAND --help for its options)\n\n"
              + "\n".join(lines), file=sys.stderr if argv and argv[0] not in ("-h", "--help")
              else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nidguard: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    if as_command and getattr(module.main, "compile_cached", False):   # as when run alone
        compile_cache.enable()
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
