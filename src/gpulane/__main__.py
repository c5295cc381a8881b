import sys

from gpulane.cli import main

sys.exit(main())
