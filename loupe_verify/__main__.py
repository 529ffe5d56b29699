import sys

from loupe_verify.cli import main

sys.exit(main())
