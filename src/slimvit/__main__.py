import sys

from slimvit.cli import main

sys.exit(main())
