"""`python -m gradcycle.prepare <overrides> prepare.out=<dir>`: tokenise a data group into shards
(the pipeline is gradcycle/data/prepare.py)."""

import sys

from gradcycle.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
