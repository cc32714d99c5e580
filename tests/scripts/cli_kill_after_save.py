"""``bimask-train`` (its ``cli``) that SIGKILLs itself right after the checkpoint of step ``$KILL_AT_STEP``.

Used by the crash-and-resume CLI test: the same entry point as the console script, plus a crash.
"""

from __future__ import annotations

import os
import signal
import sys

from transformers import TrainerCallback

import bimask_hf.trainer
from bimask_hf.train import cli


class KillAfterSave(TrainerCallback):
    """SIGKILL this process once the checkpoint of ``step`` is on disk (a crash, not a clean stop)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


_init = bimask_hf.trainer.BiMaskTrainer.__init__


def _init_with_kill(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    _init(self, *args, **kwargs)
    self.add_callback(KillAfterSave(int(os.environ["KILL_AT_STEP"])))


bimask_hf.trainer.BiMaskTrainer.__init__ = _init_with_kill  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli())
