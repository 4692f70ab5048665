import sys

from ray_fedit.cli import main

sys.exit(main())
