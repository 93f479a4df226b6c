"""``python -m mhmoe ...``: the ``mhmoe`` console script (``torchrun -m mhmoe train ...`` too).

``python -m mhmoe.cli`` keeps working as well.
"""

import sys

from mhmoe.cli import main

if __name__ == "__main__":
    sys.exit(main())
