import sys

from tsukimi.cli import main

sys.exit(main())
