"""`python -m quest.shards [convert] SOURCE OUT ...` or `python -m quest.shards index PATTERN ...`."""

import sys

from . import main

sys.exit(main())
