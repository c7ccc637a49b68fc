import sys

from depthlab.research.cli import main

sys.exit(main())
