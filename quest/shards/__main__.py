"""`python -m quest.shards SOURCE OUT ...`: convert a dataset into shards."""

import sys

from .write import main

sys.exit(main())
