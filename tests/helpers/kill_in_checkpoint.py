"""Run `cogtune train ...`, but SIGKILL the process right after accelerate has written the files of checkpoint N and
before cogtune marks it complete: what a crash or an OOM-kill in the middle of a checkpoint write looks like.

usage: python kill_in_checkpoint.py N train CONFIG [key=value ...]
"""

import os
import signal
import sys

import accelerate

STEP = sys.argv.pop(1)
original = accelerate.Accelerator.save_state


def save_state(self, output_dir=None, **kwargs):
    result = original(self, output_dir, **kwargs)
    if os.path.basename(str(output_dir)) == f".checkpoint-{STEP}.tmp":
        os.kill(os.getpid(), signal.SIGKILL)
    return result


accelerate.Accelerator.save_state = save_state

from cogtune.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
