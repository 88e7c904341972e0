"""``python -m conv2attn``."""

import sys

from conv2attn.cli import main

sys.exit(main())
