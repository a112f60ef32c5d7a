"""cogtune: fine-tune the CogVideoX family with outputs that load unchanged in diffusers."""

__version__ = "0.1.0"


def quiet_libraries() -> None:
    """Called where cogtune loads or writes diffusers/transformers models: under the `cogtune` command (without
    --debug) their progress bars go; cogtune's own stay. Deferred to here so that a command that stops early never
    imports them."""
    import os

    if os.environ.get("COGTUNE_QUIET_LIBRARIES") == "1":
        import sys

        if "deepspeed" not in sys.modules and "DS_ACCELERATOR" not in os.environ:
            import torch

            if not torch.cuda.is_available():  # what DeepSpeed picks itself, minus its warning line on import
                os.environ["DS_ACCELERATOR"] = "cpu"
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
