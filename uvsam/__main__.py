import sys

from uvsam.cli import main

sys.exit(main())
