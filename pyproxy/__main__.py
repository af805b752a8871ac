"""python -m pyproxy"""

import sys

from pyproxy.entry import main

sys.exit(main())
