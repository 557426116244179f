"""``python -m silent_kernels.api.reproduce``: the same as ``silent-vae reproduce``."""

import sys

from .command import main

sys.exit(main())
