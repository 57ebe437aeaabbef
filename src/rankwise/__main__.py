"""``python -m rankwise`` is the ``rankwise`` command (handy under ``torchrun``)."""

from rankwise.cli import run

run()
