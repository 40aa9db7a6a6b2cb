"""`python -m gradcycle.plan <overrides>`: the planner's command line (gradcycle/planner/plan.py)."""

import sys

from gradcycle.planner.plan import main

if __name__ == "__main__":
    sys.exit(main())
