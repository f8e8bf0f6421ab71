"""``python -m covidxray.cli``, as ``covidxray``."""

import sys

from covidxray.cli import main

sys.exit(main())
