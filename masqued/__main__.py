import sys

from masqued.cli import main

sys.exit(main())
