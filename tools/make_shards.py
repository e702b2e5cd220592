"""Convert a dataset into WebDataset shards plus a sizes.json index (same as `python -m quest.shards`).

    python tools/make_shards.py /data/imagenet /data/imagenet-wds --workers 32
    python tools/make_shards.py /data/imagenet /data/imagenet-wds --val-labels val_labels.txt
    python tools/make_shards.py /data/cifar-100-python data/cifar100-wds --shard-size 1000

Then in a recipe: dataset = "wds", train_shards = "/data/imagenet-wds/train-{000000..001281}.tar",
val_shards = "/data/imagenet-wds/val-{000000..000199}.tar" (the exact patterns are printed at the end
and stored in sizes.json). Rerunning after an interruption resumes from the finished shards.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quest.shards import main

if __name__ == "__main__":
    sys.exit(main())
