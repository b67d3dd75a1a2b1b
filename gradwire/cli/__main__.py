"""``python -m gradwire.cli ...``: the same as the ``gradwire`` command (Ray jobs run it this way)."""

from gradwire.cli import main

main()
