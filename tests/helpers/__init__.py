"""Code several test modules share (the scripts here run as subprocesses)."""
