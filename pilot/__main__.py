import sys

from pilot._cli import main

sys.exit(main())
