import sys

from conditune.cli import main

sys.exit(main())
