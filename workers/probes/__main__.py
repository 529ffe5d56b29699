import sys

from workers.probes.cli import main

sys.exit(main())
