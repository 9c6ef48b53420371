"""``python -m vdev`` is the ``vdev`` command."""

import sys

from vdev.cli import main

sys.exit(main())
