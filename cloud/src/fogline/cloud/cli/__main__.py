"""``python -m fogline.cloud.cli`` runs the ``fogline`` command."""

from . import main

main()
