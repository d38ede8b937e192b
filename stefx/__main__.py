import sys

from stefx.cli import main

sys.exit(main())
