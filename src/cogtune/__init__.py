"""cogtune: fine-tune the CogVideoX family with outputs that load unchanged in diffusers."""

__version__ = "0.1.0"
