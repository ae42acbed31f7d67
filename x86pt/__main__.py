import sys

from x86pt.cli import main

sys.exit(main())
