import sys

from covidxray.cli import main

sys.exit(main())
