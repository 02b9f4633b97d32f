import sys

from meshserve.server.cli import main

sys.exit(main())
